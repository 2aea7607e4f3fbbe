"""Benchmark: the whole quick run (12_driver.py --method all --quick_test), stage by stage.

Runs the driver on a fresh run folder and reports, for every stage: wall time, CPU time and peak resident memory
of its process (the driver measures them), against the 4 GB per-stage target; and, for the RL stages, seconds per
step split into generation, reward and training (from their logs), at the quick test's equal budget.

    python bench/bench_quick_run.py                      # run id bench_quick; refuses to reuse an existing one
    python bench/bench_quick_run.py --fresh              # delete outputs/bench_quick first

Writes bench/results/quick_run.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import REPO_ROOT, write_result  # noqa: E402

RSS_TARGET_MB = 4096
RL_STAGES = ("05_ppo", "06_grpo", "07_rloo")
STEP_PARTS = ("generation", "reward", "training")


def rl_step_split(stage_dir: Path) -> dict | None:
    """Mean seconds per step of generation, reward and training, from an RL stage's logs/training_log.json
    (PPO, GRPO and RLOO log the same time_* keys for each step)."""
    path = stage_dir / "logs" / "training_log.json"
    if not path.is_file():
        return None
    steps = [record for record in json.loads(path.read_text()) if "time_step_s" in record]
    if not steps:
        return None
    mean = {part: round(sum(r[f"time_{part}_s"] for r in steps) / len(steps), 2) for part in (*STEP_PARTS, "step")}
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    return {"steps": len(steps), "completions_per_step": manifest["metrics"].get("completions_per_step"),
            "mean_seconds": mean,
            "fraction": {part: round(mean[part] / mean["step"], 3) for part in STEP_PARTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", default="bench_quick")
    parser.add_argument("--fresh", action="store_true", help="delete outputs/<run_id> before running")
    parser.add_argument("--output", default="bench/results/quick_run.json")
    args = parser.parse_args()

    run_dir = REPO_ROOT / "outputs" / args.run_id
    if run_dir.exists():
        if not args.fresh:
            sys.exit(f"error: {run_dir} exists: a benchmark needs a fresh run (pass --fresh to delete it)")
        if not (run_dir / "run_manifest.json").is_file():  # only ever delete a run folder the driver wrote
            sys.exit(f"error: {run_dir} is not a run folder of 12_driver.py (no run_manifest.json); not deleting it")
        shutil.rmtree(run_dir)
    started = time.time()
    subprocess.run([sys.executable, "12_driver.py", "--method", "all", "--quick_test", "--run_id", args.run_id],
                   cwd=REPO_ROOT, check=True)
    wall = time.time() - started
    run = json.loads((run_dir / "run_manifest.json").read_text())
    stages = []
    for entry in run["stages"]:
        peak = entry.get("peak_rss_mb")
        stages.append({"stage": entry["stage"], "wall_s": entry["driver_wall_s"], "cpu_s": entry["cpu_s"],
                       "peak_rss_mb": peak, "under_4gb": None if peak is None else peak < RSS_TARGET_MB})
    slowest = max(stages, key=lambda s: s["wall_s"] or 0)
    write_result(args.output, {
        "benchmark": "quick_run", "run_dir": str(run_dir.relative_to(REPO_ROOT)), "wall_s": round(wall, 1),
        "stages_wall_s": round(sum(s["wall_s"] or 0 for s in stages), 1), "slowest_stage": slowest["stage"],
        "peak_rss_target_mb": RSS_TARGET_MB,
        "all_under_4gb": all(s["under_4gb"] for s in stages if s["under_4gb"] is not None),
        "stages": stages,
        "rl_step_split": {name: rl_step_split(run_dir / name) for name in RL_STAGES},
    })


if __name__ == "__main__":
    main()
