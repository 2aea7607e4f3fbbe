"""Stage 12: run the whole pipeline for a method, skipping what is already done (see utils/driver.py).

python 12_driver.py --method grpo --run_id run_001 [--quick_test] [--set [STAGE.]KEY=VALUE ...] [--dry_run]
Runs 00 -> 01 -> 02 -> 03 -> (04 -> 08 for dpo) -> the method(s) -> 10 (base, sft, each method) -> 11, each stage
as its own process, teed into outputs/<run_id>/driver_logs/<stage>.log; outputs/<run_id>/run_manifest.json
points at every stage manifest. --help explains the override syntax and the skip rules.
"""
import utils  # noqa: F401  (first: sets the threading environment before anything loads torch)

from utils.cli import main_guard
from utils.driver import main

if __name__ == "__main__":
    main_guard(main)
