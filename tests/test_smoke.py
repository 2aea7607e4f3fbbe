"""End-to-end smoke test: the real stages, as a user runs them, on the real model and FinQA sample data with
--quick_test. Needs `bash download.sh --finqa_dir ../shared/finqa_sample` first; skipped when the model or
data are missing, except in CI (FINQA_RL_REQUIRE_SMOKE=1), where that is a failure."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

MODEL = REPO / "models" / "smollm2-135m-instruct"
RAW = REPO / "datasets" / "finqa"


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    missing = [str(p) for p in (MODEL / "config.json", RAW / "train.json") if not p.exists()]
    if missing:
        if os.environ.get("FINQA_RL_REQUIRE_SMOKE") == "1":
            pytest.fail(f"smoke test inputs missing: {missing} (run download.sh)")
        pytest.skip(f"run download.sh first (missing {missing})")
    return tmp_path_factory.mktemp("smoke")


def run(root, script, *args, timeout=900):
    command = [sys.executable, script, "--set", f"paths.outputs_dir={root / 'outputs'}",
               "--set", f"data.processed_dir={root / 'processed'}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done


def manifest(root, folder):
    return json.loads((root / "outputs" / "run_001" / folder / "manifest.json").read_text())


def test_quick_pipeline_on_the_real_model(smoke_root):
    root = smoke_root
    run(root, "00_check_data.py")
    summary = manifest(root, "00_data_validation")["metrics"]
    assert summary["n_gold_match_exe_ans"] == summary["n_valid"] > 0
    run(root, "01_prepare_dataset.py")
    run(root, "02_build_rewards.py")
    run(root, "03_sft_train.py", "--quick_test")
    sft = manifest(root, "03_sft")
    assert sft["status"] == "completed" and sft["metrics"]["steps"] > 0
    run(root, "04_generate_candidates.py", "--quick_test")
    assert manifest(root, "04_candidates")["metrics"]["n_candidates"] > 0
    run(root, "10_evaluate.py", "--label", "sft", "--quick_test")
    metrics = json.loads((root / "outputs" / "run_001" / "10_evaluation" / "sft" / "metrics.json").read_text())
    assert metrics["n_examples"] == 8 and 0.0 <= metrics["format_compliance"] <= 1.0
