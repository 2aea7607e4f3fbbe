"""End-to-end smoke test: the README's main job (`12_driver.py --method all --quick_test`) on the real model and
FinQA sample data, every stage as its own process. Needs `bash download.sh --finqa_dir ../shared/finqa_sample`
first; skipped when the model or data are missing, except in CI (FINQA_RL_REQUIRE_SMOKE=1), where that is a
failure."""
import json
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from conftest import REPO

MODEL = REPO / "models" / "smollm2-135m-instruct"
RAW = REPO / "datasets" / "finqa"
METHODS = ("ppo", "grpo", "rloo", "dpo")


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    missing = [str(p) for p in (MODEL / "config.json", RAW / "train.json") if not p.exists()]
    if missing:
        if os.environ.get("FINQA_RL_REQUIRE_SMOKE") == "1":
            pytest.fail(f"smoke test inputs missing: {missing} (run download.sh)")
        pytest.skip(f"run download.sh first (missing {missing})")
    return tmp_path_factory.mktemp("smoke")


def drive(root, *args, timeout=1800):
    command = [sys.executable, "12_driver.py", "--method", "all", "--quick_test",
               "--set", f"paths.outputs_dir={root / 'outputs'}", "--set", f"data.processed_dir={root / 'processed'}",
               *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"12_driver.py failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_quick_full_run_with_the_driver(smoke_root):
    run_dir = smoke_root / "outputs" / "run_001"
    drive(smoke_root)

    run_manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert run_manifest["status"] == "completed"
    assert {e["stage"]: e["status"] for e in run_manifest["stages"]} == {e["stage"]: "completed"
                                                                        for e in run_manifest["stages"]}
    data = json.loads((run_dir / "00_data_validation" / "manifest.json").read_text())["metrics"]
    assert data["n_gold_match_exe_ans"] == data["n_valid"] > 0
    sft = json.loads((run_dir / "03_sft" / "manifest.json").read_text())
    assert sft["metrics"]["steps"] > 0
    assert json.loads((run_dir / "04_candidates" / "manifest.json").read_text())["metrics"]["n_candidates"] > 0

    # every method's checkpoint was evaluated, and the report's table holds exactly the metrics files' numbers
    summary = pd.read_csv(run_dir / "11_comparison" / "summary.csv")
    assert set(summary["label"]) == {"base", "sft", *METHODS}
    for row in summary.to_dict("records"):
        metrics = json.loads((run_dir / "10_evaluation" / row["label"] / "metrics.json").read_text())
        assert metrics["n_examples"] == 6
        for key in ("execution_accuracy", "program_accuracy", "format_compliance", "mean_reward"):
            assert row[key] == pytest.approx(metrics[key], abs=1e-12)
    report = (run_dir / "11_comparison" / "report.md").read_text()
    assert "McNemar" in report and all(f"| {method} |" in report for method in METHODS)
    assert list((run_dir / "11_comparison" / "plots").glob("*.png"))

    # the same command again does nothing and says so
    before = {p: p.read_text() for p in run_dir.glob("**/manifest.json")}
    out = drive(smoke_root)
    assert "nothing to do" in out
    assert {p: p.read_text() for p in run_dir.glob("**/manifest.json")} == before

    # scripts/gpu_run.py --quick_test: the same driver run (so nothing left to do) and its results bundle
    paths = ["--set", f"paths.outputs_dir={smoke_root / 'outputs'}",
             "--set", f"data.processed_dir={smoke_root / 'processed'}"]
    done = subprocess.run([sys.executable, "scripts/gpu_run.py", "--quick_test", "--run_id", "run_001", "--", *paths],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    with tarfile.open(run_dir / "bundle.tar.gz") as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile("run_001/bundle_info.json"))
    assert {"run_001/run_manifest.json", "run_001/11_comparison/summary.csv"} <= names
    assert {f"run_001/10_evaluation/{label}/metrics.json" for label in ("base", "sft", *METHODS)} <= names
    assert info["driver_exit_code"] == 0 and info["quick_test"] and "torch" in info
