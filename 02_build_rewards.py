"""Stage 02: fix the reward every later stage uses, and prove it on edge cases.

Writes reward_spec.yaml (the weights; `--reward_spec FILE` starts from another spec), runs the edge-case table
(correct program, wrong scale, wrong op, invalid JSON, partial program, table ops, greater/yes-no, ...) into
unit_tests/test_cases.json and unit_tests/test_results.json, and exits non-zero if any case fails.
"""
import yaml

from utils.cli import main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.reward import RewardCalculator, RewardWeights
from utils.reward_cases import case_table, run_cases
from utils.runs import StageError, stage_run, write_json_atomic, write_text_atomic
from utils.stages import STAGES

STAGE = STAGES["rewards"]


def main() -> int:
    parser = stage_parser(__doc__, STAGE)
    parser.add_argument("--reward_spec", default=None, help="start from this reward_spec.yaml "
                                                            "(default: docs/design.md's weights)")
    args = parser.parse_args()
    config = resolve_config(args)
    log = setup_logging()

    with stage_run(STAGE.manifest_name, stage_dir(args, config, STAGE.key), config, args.seed,
                   overwrite=args.overwrite, keep_partial=False) as run:
        if args.reward_spec:
            weights = RewardWeights.from_spec(run.add_input("reward_spec", args.reward_spec))
        else:
            weights = RewardWeights()
        spec_path = run.add_output("reward_spec", run.dir / "reward_spec.yaml")
        write_text_atomic(spec_path, "# The reward every stage uses (utils/reward.py); weights of its components.\n"
                          + yaml.safe_dump(weights.to_spec(), sort_keys=False))

        written = RewardWeights.from_spec(spec_path)  # the spec as every later stage will read it
        results = run_cases(RewardCalculator(written))
        write_json_atomic(run.add_output("test_cases", run.dir / "unit_tests" / "test_cases.json"),
                          case_table(written))
        write_json_atomic(run.add_output("test_results", run.dir / "unit_tests" / "test_results.json"), results)
        failed = [r for r in results if not r["passed"]]
        for result in failed:
            log.error("reward case failed: %s: %s", result["name"], result["failed"])
        run.metrics.update({"n_cases": len(results), "n_passed": len(results) - len(failed),
                            "reward_bounds": list(weights.bounds())})
        log.info("reward edge cases: %d/%d passed", len(results) - len(failed), len(results))
        if failed:
            raise StageError(f"{len(failed)} reward edge case(s) failed: "
                             f"{', '.join(r['name'] for r in failed)} (see {run.dir / 'unit_tests'})")
    return 0


if __name__ == "__main__":
    main_guard(main)
