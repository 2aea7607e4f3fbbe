"""Stage 11: compare evaluations across methods, seeds and runs.

Inputs: metrics.json files, evaluation or run folders, or globs (default:
outputs/run_*/10_evaluation/*/metrics.json). Writes to --output_dir (default outputs/11_comparison):
summary.csv (one row per evaluation: run, method, seed, model, every metric of its metrics.json, training wall
time, tokens and completions where the training manifest logs them), report.md (a table per metric, the best
method per metric, each method against the baseline of the same run on the same test items: exact McNemar test
on execution match, paired bootstrap CIs and the test's minimum detectable effect, MDE: utils/stats.mcnemar_mde;
summary.csv carries each row's difference, p-value and MDE against the baseline too), and plots/ (metrics by method with error bars over seeds,
training reward/loss curves, accuracy against compute).

--diff RUN_A RUN_B prints what differs between two runs (resolved config keys per stage, inputs' sha256, package
versions, metric deltas) and writes nothing.
"""
import argparse

import utils  # noqa: F401  (first: sets the threading environment before anything loads torch)

from utils import plots
from utils.cli import main_guard, setup_logging
from utils.compare import (DEFAULT_INPUT, best_per_metric, bootstrap_all, comparison_config, group_stats,
                           paired_tests, report_markdown, split_mde, summary_frame, training_curves,
                           with_paired_tests)
from utils.evaluations import HEADLINE, completed_metrics_files, load_evaluations
from utils.run_diff import diff_runs, format_diff, resolve_run
from utils.runs import StageError, stage_run, write_atomic, write_json_atomic, write_text_atomic
from utils.stages import STAGES

STAGE = STAGES["comparison"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", default=[DEFAULT_INPUT],
                        help=f"metrics.json files, run or evaluation folders, globs (default: {DEFAULT_INPUT})")
    parser.add_argument("--output_dir", default="outputs/11_comparison", help="where the comparison goes")
    parser.add_argument("--baseline", default=None, help="label the paired tests compare against (config: baseline, "
                                                         "default sft)")
    parser.add_argument("--n_bootstrap", type=int, default=None, help="bootstrap resamples (config: n_bootstrap, "
                                                                       "default 2000)")
    parser.add_argument("--confidence", type=float, default=None, help="interval level (config: confidence, "
                                                                        "default 0.95)")
    parser.add_argument("--seed", type=int, default=42, help="bootstrap seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of this stage's config (baseline, n_bootstrap, confidence)")
    parser.add_argument("--overwrite", action="store_true", help="replace a completed comparison in --output_dir")
    parser.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                        help="print what differs between two runs (run ids under --outputs_root, or folders)")
    parser.add_argument("--outputs_root", default="outputs", help="where --diff looks for run ids")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    log = setup_logging()
    if args.diff:
        print(format_diff(diff_runs(resolve_run(args.diff[0], args.outputs_root),
                                    resolve_run(args.diff[1], args.outputs_root))))
        return 0
    named = {"baseline": args.baseline, "n_bootstrap": args.n_bootstrap, "confidence": args.confidence}
    config = comparison_config(args.inputs, args.overrides, named)
    paths = completed_metrics_files(config["inputs"])
    if not paths:
        raise StageError(f"no metrics.json of a completed evaluation found in {', '.join(config['inputs'])} "
                         f"(run 10_evaluate.py first)")

    with stage_run(STAGE.manifest_name, args.output_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=False) as run:
        results = load_evaluations(paths)
        for result in results:
            name = f"{result.run}/{result.label}"
            run.add_input(f"{name}/metrics", result.metrics_path)
            if result.breakdown_path is not None:
                run.add_input(f"{name}/breakdown", result.breakdown_path)
            if result.train_dir is not None and (result.train_dir / "manifest.json").is_file():
                run.add_input(f"{name}/training_manifest", result.train_dir / "manifest.json")
            if result.training_log is not None:
                run.add_input(f"{name}/training_log", result.training_log)

        cis = bootstrap_all(results, config, args.seed)
        tests, notes = paired_tests(results, config, args.seed)
        summary = with_paired_tests(summary_frame(results, cis), tests)
        write_atomic(run.add_output("summary", run.dir / "summary.csv"), lambda f: summary.to_csv(f, index=False))
        write_json_atomic(run.add_output("paired_tests", run.dir / "paired_tests.json"), tests)

        bars = {}
        for metric in HEADLINE:
            entries = []
            for _, stat in group_stats(summary, metric).iterrows():
                if stat["n_runs"] == 0:
                    continue
                if stat["n_runs"] > 1:
                    low, high = stat["mean"] - stat["std"], stat["mean"] + stat["std"]
                else:
                    row = summary[(summary["method"] == stat["method"])].iloc[0]
                    ci = cis.get((row["run"], row["label"]), {}).get(metric)
                    low, high = (ci["low"], ci["high"]) if ci else (None, None)
                entries.append({"method": stat["method"], "value": stat["mean"], "low": low, "high": high})
            bars[metric] = entries
        plot_dir = run.dir / "plots"
        made = {
            "metrics by method": plots.metrics_by_method(bars, plot_dir / "metrics_by_method.png"),
            "training curves": plots.training_curves(training_curves(results), plot_dir / "training_curves.png"),
            "accuracy vs compute": plots.accuracy_vs_compute(
                [{"name": f"{r['run']}/{r['label']}", "accuracy": r["execution_accuracy"],
                  "seconds": r.get("compute_wall_time_s"), "completions": r.get("train_completions")}
                 for r in summary.where(summary.notna(), None).to_dict("records")],
                plot_dir / "accuracy_vs_compute.png"),
        }
        run.add_output("plots", plot_dir)
        report = report_markdown(summary, results, cis, tests, notes, config, args.seed,
                                 {name: str(path.relative_to(run.dir)) for name, path in made.items()})
        write_text_atomic(run.add_output("report", run.dir / "report.md"), report)

        best = best_per_metric(summary)
        run.metrics.update({"n_evaluations": len(results), "n_runs": int(summary["run"].nunique()),
                            "methods": list(dict.fromkeys(summary["method"])),
                            "best": {b["metric"]: {"method": b["best"], "mean": b["mean"]} for b in best},
                            "paired_tests": [{k: t[k] for k in ("run", "label", "diff", "b", "c", "p_value", "mde")}
                                             for t in tests],
                            "split_mde": split_mde(tests)})
        for note in notes:
            log.info("%s", note)
        for b in best:
            log.info("best %s: %s (%.4f)", b["metric"], b["best"], b["mean"])
        log.info("comparison of %d evaluation(s) written to %s", len(results), run.dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
