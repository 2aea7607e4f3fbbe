"""12_driver.py (plan, skip / re-run / resume rules, failures) on the tiny model, and 11_compare_runs.py on
synthetic evaluations of two methods and two seeds."""
import json
from math import comb
from pathlib import Path

import pandas as pd
import pytest

from conftest import flatten_dict, run_script
from utils.cli import UsageError
from utils.driver import DriverSettings, Resolver, build_plan, main as driver_main, parse_methods, \
    plan_and_resolver, select_stages
from utils.runs import read_manifest, sha256_path, write_json_atomic
from utils.stats import mcnemar_mde

# the cheap part of the pipeline: real stages, each its own process (01, 02, base evaluation, comparison);
# after the first two invocations the comparison is left out to keep the test short
CHAIN = ("--stages", "01,02,10/base,11")
SHORT = ("--stages", "01,02,10/base")


def drive(runner, *args: str) -> tuple[int, str]:
    out: list[str] = []
    code = driver_main(["--method", "none", "--quick_test", *runner.base, *args], echo=out.append)
    return code, "".join(out)


def plan_line(output: str, stage: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith("[") and f"] {stage} " in line)


def actions(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    return {entry["stage"]: entry["action"] for entry in manifest["stages"]}


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("**/manifest.json"))}


def test_plan_order_and_selection():
    assert parse_methods("all") == ["ppo", "grpo", "rloo", "dpo"] and parse_methods("none") == []
    names = [spec.name for spec in build_plan(parse_methods("dpo"))]
    assert names == ["00_data_validation", "01_preprocessing", "02_rewards", "03_sft", "04_candidates",
                     "08_preferences", "09_dpo", "10_evaluation/base", "10_evaluation/sft", "10_evaluation/dpo",
                     "11_comparison"]
    plan = build_plan(parse_methods("grpo"))
    assert [s.name for s in select_stages(plan, None, "03")][-1] == "03_sft"
    assert [s.name for s in select_stages(plan, "02,10", None)] == [
        "02_rewards", "10_evaluation/base", "10_evaluation/sft", "10_evaluation/grpo"]
    with pytest.raises(UsageError, match="--method"):
        parse_methods("sgd")


def test_candidates_join_the_plan_for_mixed_train_prompts(tmp_path):
    def plan(methods, *overrides):
        settings = DriverSettings("configs/models/smollm2-135m.yaml", "run_x", 42, True,
                                  [f"paths.outputs_dir={tmp_path}", *overrides])
        return {spec.name: spec for spec in plan_and_resolver(parse_methods(methods), settings)[0]}

    assert "04_candidates" not in plan("grpo,rloo")
    mixed = plan("grpo,rloo", "grpo.algorithm.train_prompts=mixed")
    names = list(mixed)
    assert names.index("03_sft") < names.index("04_candidates") < names.index("06_grpo")
    assert "04_candidates" in mixed["06_grpo"].depends and "04_candidates" not in mixed["07_rloo"].depends
    every = plan("ppo,grpo", "algorithm.train_prompts=mixed")
    assert all("04_candidates" in every[name].depends for name in ("05_ppo", "06_grpo"))
    # scores given explicitly: nothing of this run's 04 is read
    given = plan("grpo", "algorithm.train_prompts=mixed", f"algorithm.candidate_scores={tmp_path / 's.jsonl'}")
    assert "04_candidates" not in given


def test_override_routing(tmp_path):
    plan = build_plan(parse_methods("ppo"))
    settings = DriverSettings("configs/models/smollm2-135m.yaml", "run_x", 42, True, [
        "generation.max_new_tokens=8",          # every stage that has it (all model stages)
        "algorithm.ppo_epochs=2",               # only the stages whose config has it (05)
        "03_sft.algorithm.epochs=2",            # folder prefix
        "10.evaluation.max_examples=3",         # number prefix: every evaluation
        "10_evaluation/ppo.generation.batch_size=2",  # one evaluation
        "n_bootstrap=100",                      # 11's own key
        f"paths.outputs_dir={tmp_path}",
    ])
    resolver = Resolver(settings, plan)
    by_name = {spec.name: spec for spec in plan}
    config = {name: resolver.config(spec) for name, spec in by_name.items()}
    assert all(config[n]["generation"]["max_new_tokens"] == 8 for n in by_name if n != "11_comparison")
    assert config["05_ppo"]["algorithm"]["ppo_epochs"] == 2
    assert config["03_sft"]["algorithm"]["epochs"] == 2 and config["03_sft"]["algo_config_file"].endswith("sft.yaml")
    assert config["10_evaluation/sft"]["evaluation"]["max_examples"] == 3
    assert config["10_evaluation/ppo"]["generation"]["batch_size"] == 2
    assert config["10_evaluation/sft"]["generation"]["batch_size"] != 2
    assert config["11_comparison"]["n_bootstrap"] == 100
    assert resolver.run_root == tmp_path / "run_x"
    assert "--set" in resolver.command(by_name["03_sft"], "fresh")
    for bad in ("algorithm.no_such_key=1", "03_sft.paths.outputs_dir=/tmp/x"):
        with pytest.raises(UsageError):
            Resolver(DriverSettings("configs/models/smollm2-135m.yaml", "run_x", 42, True, [bad]), plan)


def test_driver_skips_reruns_and_resumes(run_stage):
    root = run_stage.root
    run_dir = root / "outputs" / "run_001"

    # a dry run prints the plan and runs nothing
    code, out = drive(run_stage, *CHAIN, "--dry_run")
    assert code == 0 and "dry run: nothing was run" in out
    assert "01_prepare_dataset.py" in out and "10_evaluate.py" in out and "--base" in out
    assert all(" RUN " in plan_line(out, s) for s in ("01_preprocessing", "02_rewards", "10_evaluation/base"))
    assert not (root / "outputs").exists()

    code, out = drive(run_stage, *CHAIN)
    assert code == 0, out
    assert actions(run_dir) == {"01_preprocessing": "ran", "02_rewards": "ran", "10_evaluation/base": "ran",
                                "11_comparison": "ran"}
    for folder in ("01_preprocessing", "02_rewards", "10_evaluation/base", "11_comparison"):
        assert read_manifest(run_dir / folder)["status"] == "completed"
        assert (run_dir / "driver_logs" / f"{folder.replace('/', '_')}.log").is_file()
    assert "[3/4] 10_evaluation/base" in out and "evaluating base" in out  # progress and the stage's own output
    run_manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert run_manifest["status"] == "completed" and run_manifest["wall_time_s"] > 0
    assert all(e["duration_s"] is not None and Path(e["manifest"]).is_file() for e in run_manifest["stages"])
    assert all(e["peak_rss_mb"] > 50 for e in run_manifest["stages"])  # each stage process imports torch
    assert (run_dir / "11_comparison" / "report.md").is_file()

    # the same command again does nothing, and says so
    before = snapshot(run_dir)
    code, out = drive(run_stage, *CHAIN)
    assert code == 0 and "nothing to do" in out
    assert set(actions(run_dir).values()) == {"skipped"} and snapshot(run_dir) == before

    # a folder without a manifest of its stage is not the project's to replace: the plan refuses it
    manifest_02 = (run_dir / "02_rewards" / "manifest.json").read_text()
    (run_dir / "02_rewards" / "manifest.json").unlink()
    code, out = drive(run_stage, *CHAIN, "--dry_run")
    assert code == 1 and " ERROR " in plan_line(out, "02_rewards") and "did not write" in out
    code, out = drive(run_stage, *CHAIN)
    assert code == 1 and (run_dir / "02_rewards" / "reward_spec.yaml").is_file()  # nothing deleted

    # an interrupted stage (manifest 'running') re-runs; the plan marks what depends on it, and each of those is
    # checked again after it ran: 02 reproduces the same reward_spec.yaml, so the evaluation stays valid
    spec_hash = sha256_path(run_dir / "02_rewards" / "reward_spec.yaml")
    (run_dir / "02_rewards" / "manifest.json").write_text(manifest_02.replace('"completed"', '"running"', 1))
    code, out = drive(run_stage, *CHAIN, "--dry_run")
    assert " skip " in plan_line(out, "01_preprocessing")
    assert " RUN " in plan_line(out, "02_rewards")
    assert "upstream 02_rewards re-runs" in plan_line(out, "10_evaluation/base")
    assert "upstream 10_evaluation/base re-runs" in plan_line(out, "11_comparison")
    code, out = drive(run_stage, *CHAIN)
    assert code == 0, out
    assert actions(run_dir) == {"01_preprocessing": "skipped", "02_rewards": "ran", "10_evaluation/base": "skipped",
                                "11_comparison": "skipped"}
    assert sha256_path(run_dir / "02_rewards" / "reward_spec.yaml") == spec_hash
    assert "re-checked: the inputs it reads are unchanged" in out
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("02_")} == \
           {k: v for k, v in before.items() if not k.startswith("02_")}

    # a changed override re-runs that stage and what reads its (now different) outputs, nothing else (10 reads
    # the rows in the setting 01 built them in: processed_set.json refuses a reader configured otherwise)
    changed = ("--set", "01.data.context_mode=full", "--set", "10.data.context_mode=full")
    code, out = drive(run_stage, *CHAIN, *changed, "--dry_run")
    assert "config changed: data.context_mode: 'gold' -> 'full'" in plan_line(out, "01_preprocessing")
    assert "RUN (overwrite)" in plan_line(out, "01_preprocessing") and " skip " in plan_line(out, "02_rewards")
    assert "upstream 01_preprocessing re-runs" in plan_line(out, "10_evaluation/base")
    code, out = drive(run_stage, *SHORT, *changed)
    assert code == 0, out
    assert actions(run_dir) == {"01_preprocessing": "ran", "02_rewards": "skipped", "10_evaluation/base": "ran"}
    assert "input test changed" in out

    # a new evaluation in the run is a new input of the comparison
    extra = run_dir / "10_evaluation" / "extra"
    extra.mkdir()
    for name in ("metrics.json", "breakdown.csv"):
        (extra / name).write_text((run_dir / "10_evaluation" / "base" / name).read_text())
    code, out = drive(run_stage, *CHAIN, *changed, "--dry_run")
    assert "new evaluation extra" in plan_line(out, "11_comparison")

    # a half-written folder (manifest still 'running', e.g. after kill -9) is not trusted: re-run
    path = run_dir / "10_evaluation" / "base" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["status"] = "running"
    path.write_text(json.dumps(manifest))
    code, out = drive(run_stage, *SHORT, *changed, "--dry_run")
    assert "RUN (overwrite)" in plan_line(out, "10_evaluation/base") and "status 'running'" in out
    code, out = drive(run_stage, *SHORT, *changed)
    assert code == 0, out
    assert actions(run_dir)["10_evaluation/base"] == "ran" and read_manifest(path.parent)["status"] == "completed"
    code, out = drive(run_stage, *SHORT, *changed)
    assert "nothing to do" in out

    # an interrupted SFT with a trainer checkpoint and unchanged config resumes; a changed config starts over
    plan = build_plan([])
    sft = next(spec for spec in plan if spec.name == "03_sft")
    overrides = [arg for arg in run_stage.base if arg != "--set"]
    resolver = Resolver(DriverSettings("configs/models/smollm2-135m.yaml", "run_001", 42, True, overrides), plan)
    folder = run_dir / "03_sft"
    train = root / "processed" / "train.jsonl"
    write_json_atomic(folder / "manifest.json", {"stage": "03_sft_train", "status": "running", "seed": 42,
                                                 "config": resolver.config(sft),
                                                 "inputs": {"train": {"path": str(train),
                                                                      "sha256": sha256_path(train)}}})
    (folder / "ckpt_sft" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    code, out = drive(run_stage, *changed, "--until", "03", "--dry_run")
    assert "RUN (resume)" in plan_line(out, "03_sft")
    assert "--resume" in out.split("] 03_sft ", 1)[1] and "--overwrite" not in out.split("] 03_sft ", 1)[1]
    code, out = drive(run_stage, *changed, "--until", "03", "--dry_run", "--set", "03.algorithm.max_steps=3")
    assert "RUN (overwrite)" in plan_line(out, "03_sft")


def test_failing_stage_stops_the_driver(run_stage):
    run_dir = run_stage.root / "outputs" / "run_001"
    code, out = drive(run_stage, "--stages", "00,01", "--set", f"00.data.raw_dir={run_stage.root / 'nowhere'}")
    assert code == 1
    assert "00_data_validation: FAILED" in out and "last lines of" in out
    assert "error:" in out.split("FAILED", 1)[1]  # the stage's own error line, from the tail of its log
    assert not (run_dir / "01_preprocessing").exists()  # the driver stopped
    run_manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert run_manifest["status"] == "failed"
    assert actions(run_dir) == {"00_data_validation": "failed", "01_preprocessing": "pending"}
    assert read_manifest(run_dir / "00_data_validation")["status"] == "failed"


# ------------------------------------------------------------------------------------------------------------
# 11_compare_runs.py on synthetic evaluations

N_ITEMS = 10
EXEC = {  # run -> label -> exec_match per item
    "run_a": {"sft": [1, 1, 1, 0, 0, 0, 0, 0, 1, 0], "grpo": [1, 1, 0, 1, 1, 1, 0, 0, 1, 0]},
    "run_b": {"sft": [1, 0, 1, 0, 0, 0, 1, 0, 1, 0], "grpo": [1, 0, 1, 1, 0, 0, 1, 1, 1, 1]},
}
SEEDS = {"run_a": 1, "run_b": 2}
LEARNING_RATES = {"run_a": 2.0e-5, "run_b": 5.0e-5}


def write_synthetic_run(outputs: Path, run: str) -> Path:
    run_dir = outputs / run
    env = {"python": "3.11.7", "torch": "2.13.0" if run == "run_a" else "2.14.0", "transformers": "5.23.0"}
    model = {"name": "tiny-test-model", "path": "models/tiny"}
    sft_ckpt = run_dir / "03_sft" / "ckpt_sft" / "best"
    sft_ckpt.mkdir(parents=True)
    (sft_ckpt / "adapter_model.safetensors").write_text(f"sft weights {run}")
    write_json_atomic(run_dir / "03_sft" / "logs" / "training_log.json",
                      [{"step": s, "loss": 2.0 / s} for s in range(1, 5)])
    write_json_atomic(run_dir / "03_sft" / "manifest.json", {
        "stage": "03_sft_train", "status": "completed", "seed": SEEDS[run], "duration_s": 100.0,
        "config": {"model": model, "algorithm": {"epochs": 3}}, "environment": env,
        "inputs": {}, "metrics": {"num_input_tokens_seen": 5000, "steps": 4}})
    grpo_ckpt = run_dir / "06_grpo" / "ckpt_grpo" / "final"
    grpo_ckpt.mkdir(parents=True)
    (grpo_ckpt / "adapter_model.safetensors").write_text(f"grpo weights {run}")
    write_json_atomic(run_dir / "06_grpo" / "logs" / "training_log.json",
                      [{"step": s, "reward": 0.1 * s, "loss": 0.5, "kl": 0.01 * s} for s in range(1, 6)])
    write_json_atomic(run_dir / "06_grpo" / "manifest.json", {
        "stage": "06_train_grpo", "status": "completed", "seed": SEEDS[run], "duration_s": 250.0,
        "config": {"model": model, "algorithm": {"learning_rate": LEARNING_RATES[run], "num_generations": 4}},
        "environment": env, "metrics": {"total_completions": 320, "total_generated_tokens": 9000, "steps": 5,
                                        "groups_with_zero_reward_variance": {"per_step": [1.0, 0.5, 0.5, 0.0, 0.25]}},
        "inputs": {"policy": {"path": str(sft_ckpt), "sha256": sha256_path(sft_ckpt)}}})
    for label, ckpt in (("sft", sft_ckpt), ("grpo", grpo_ckpt)):
        folder = run_dir / "10_evaluation" / label
        folder.mkdir(parents=True)
        exec_match = EXEC[run][label]
        rows = [{"id": f"item_{i}", "exec_match": bool(e), "program_match": bool(e), "numeric_match": bool(e),
                 "format_ok": True, "program_valid": i % 5 != 4, "reward": 1.0 if e else 0.3 * (i % 2),
                 "failure_reason": "correct" if e else "wrong_value"} for i, e in enumerate(exec_match)]
        pd.DataFrame(rows).to_csv(folder / "breakdown.csv", index=False)
        frame = pd.DataFrame(rows)
        metrics = {"n_examples": N_ITEMS, "execution_accuracy": round(sum(exec_match) / N_ITEMS, 5),
                   "program_accuracy": round(frame["program_match"].mean(), 5),
                   "numeric_accuracy": round(frame["numeric_match"].mean(), 5), "format_compliance": 1.0,
                   "program_validity": round(frame["program_valid"].mean(), 5),
                   "mean_reward": round(frame["reward"].mean(), 5), "scale_error_rate": 0.0,
                   "failure_reasons": dict(frame["failure_reason"].value_counts()),
                   "mean_completion_tokens": 31.7, "label": label, "split": "test",
                   "official_recheck": {"execution_accuracy": round(sum(exec_match) / N_ITEMS, 5)}}
        metrics["failure_reasons"] = {k: int(v) for k, v in metrics["failure_reasons"].items()}
        write_json_atomic(folder / "metrics.json", metrics)
        write_json_atomic(folder / "manifest.json", {
            "stage": "10_evaluate", "status": "completed", "seed": 42, "label": label,
            "config": {"model": model}, "environment": env, "duration_s": 10.0,
            "inputs": {"checkpoint": {"path": str(ckpt), "sha256": sha256_path(ckpt)}}})
    return run_dir


def run_compare(*args: str) -> int:
    return run_script("11_compare_runs.py", *args)


def test_compare_runs_summary_tests_plots_and_diff(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    for run in EXEC:
        write_synthetic_run(outputs, run)
    out_dir = tmp_path / "comparison"
    assert run_compare(str(outputs / "run_*" / "10_evaluation" / "*" / "metrics.json"),
                       "--output_dir", str(out_dir), "--seed", "7") == 0

    # every number in summary.csv equals its metrics.json
    summary = pd.read_csv(out_dir / "summary.csv")
    assert len(summary) == 4 and set(summary["label"]) == {"sft", "grpo"}
    for row in summary.to_dict("records"):
        metrics = flatten_dict(json.loads(Path(row["metrics_path"]).read_text()))
        for key, value in metrics.items():
            if key in ("label",):
                continue
            assert row[key] == value, (row["run"], row["label"], key)
        assert row["seed"] == SEEDS[row["run"]] and row["model"] == "tiny-test-model"
        if row["label"] == "grpo":
            assert row["train_stage"] == "06_grpo" and row["train_wall_time_s"] == 250.0
            assert row["train_completions"] == 320 and row["train_tokens"] == 9000
            assert row["compute_wall_time_s"] == 350.0  # GRPO + the SFT it started from
        else:
            assert row["train_tokens"] == 5000 and row["compute_wall_time_s"] == 100.0

    # McNemar counts and p-value by hand; bootstrap intervals contain their point estimates
    tests = {t["run"]: t for t in json.loads((out_dir / "paired_tests.json").read_text())}
    for run, labels in EXEC.items():
        b = sum(m and not s for s, m in zip(labels["sft"], labels["grpo"]))
        c = sum(s and not m for s, m in zip(labels["sft"], labels["grpo"]))
        n = b + c
        p = min(1.0, 2 * sum(comb(n, k) for k in range(0, min(b, c) + 1)) / 2 ** n)
        assert (tests[run]["b"], tests[run]["c"]) == (b, c)
        assert tests[run]["p_value"] == pytest.approx(p)
        assert tests[run]["diff"] == pytest.approx((sum(labels["grpo"]) - sum(labels["sft"])) / N_ITEMS)
        low, high = tests[run]["diff_ci"]
        assert low <= tests[run]["diff"] <= high
        low, high = tests[run]["accuracy_ci"]
        assert low <= tests[run]["accuracy"] <= high
        # 10 items with 4-5 discordant: no difference is detectable with 80% power (tests/test_power.py: the formula)
        assert tests[run]["mde"] is None and mcnemar_mde(N_ITEMS, n) is None
    assert (tests["run_a"]["b"], tests["run_a"]["c"], tests["run_a"]["p_value"]) == (3, 1, pytest.approx(0.625))
    for row in summary.to_dict("records"):  # each row carries its paired test
        test = tests[row["run"]] if row["label"] == "grpo" else None
        assert row["p_vs_baseline"] == pytest.approx(test["p_value"]) if test else pd.isna(row["p_vs_baseline"])
        assert pd.isna(row["mde_vs_baseline"])
    for row in summary.to_dict("records"):
        assert row["execution_accuracy_ci_low"] <= row["execution_accuracy"] <= row["execution_accuracy_ci_high"]

    report = (out_dir / "report.md").read_text()
    assert "## execution_accuracy" in report and "Best method per metric" in report
    assert "| run_a | grpo | 10 |" in report and "0.625" in report
    assert "| – | not detected; at this discordance no difference is detectable |" in report
    assert "no effect" not in report.replace("never read as no effect", "")
    grpo_mean = (sum(EXEC["run_a"]["grpo"]) + sum(EXEC["run_b"]["grpo"])) / (2 * N_ITEMS)
    assert f"| execution_accuracy | grpo | {grpo_mean:.4f} |" in report
    assert "(std over 2 runs)" in report
    for name in ("metrics_by_method.png", "training_curves.png", "accuracy_vs_compute.png"):
        assert (out_dir / "plots" / name).stat().st_size > 1000
    from utils.compare import training_curves
    from utils.evaluations import completed_metrics_files, load_evaluations

    curves = {c["name"]: c for c in training_curves(load_evaluations(completed_metrics_files([str(outputs)])))}
    grpo, sft = curves["run_a/grpo"], curves["run_a/sft"]
    assert grpo["kl"]["values"] == pytest.approx([0.01 * s for s in range(1, 6)])
    assert grpo["zero_variance"] == {"key": "groups_with_zero_reward_variance", "steps": [1, 2, 3, 4, 5],
                                     "values": [1.0, 0.5, 0.5, 0.0, 0.25]}
    assert "loss" in sft and "kl" not in sft and "zero_variance" not in sft
    manifest = read_manifest(out_dir)
    assert manifest["status"] == "completed" and manifest["config"]["n_bootstrap"] == 2000
    assert "run_a/grpo/breakdown" in manifest["inputs"] and "run_b/grpo/training_log" in manifest["inputs"]

    # same inputs and seed -> the same numbers; a completed comparison is not replaced without --overwrite
    assert run_compare(str(outputs), "--output_dir", str(out_dir), "--seed", "7") == 1
    assert run_compare(str(outputs), "--output_dir", str(out_dir), "--seed", "7", "--overwrite") == 0
    again = {t["run"]: t for t in json.loads((out_dir / "paired_tests.json").read_text())}
    assert again == tests

    # the ablation view: what differs between the two runs
    capsys.readouterr()
    assert run_compare("--diff", "run_a", "run_b", "--outputs_root", str(outputs)) == 0
    diff = capsys.readouterr().out
    assert "== 06_grpo" in diff and "algorithm.learning_rate: 2e-05 -> 5e-05" in diff
    assert "seed    1 -> 2" in diff and "torch: 2.13.0 -> 2.14.0" in diff
    assert "policy:" in diff  # the SFT checkpoint each started from differs
    delta = (sum(EXEC["run_b"]["grpo"]) - sum(EXEC["run_a"]["grpo"])) / N_ITEMS
    assert f"grpo     execution_accuracy: {sum(EXEC['run_a']['grpo']) / N_ITEMS:.4f} -> " \
           f"{sum(EXEC['run_b']['grpo']) / N_ITEMS:.4f} ({delta:+.4g})" in diff


def test_compare_rejects_empty_inputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_compare(str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")) == 1
    assert "no metrics.json of a completed evaluation found" in capsys.readouterr().err
