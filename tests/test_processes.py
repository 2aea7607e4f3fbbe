"""Stages on two processes (torchrun on the CPU, gloo) against one, on the tiny model: one manifest and one
checkpoint written by the main process, the same first-step loss for the same global batch, and the same
evaluation."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from utils.runs import read_manifest

FLOAT32 = ("--set", "model.dtype=float32", "--set", "model.torch_threads=2")  # the comparisons need one precision


def on_processes(run_stage, count: int, script: str, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
               str(REPO / script), *run_stage.base, *FLOAT32, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script} on {count} process(es): " + result.stderr[-6000:]


def first_loss(folder) -> float:
    return json.loads((folder / "logs" / "training_log.json").read_text())[0]["loss"]


def test_every_stage_that_splits_its_work_runs_on_two_processes(run_stage):
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("02_build_rewards.py") == 0
    sft = ["--quick_test", "--skip_validation", "--set", "algorithm.max_steps=1", "--set", "algorithm.logging_steps=1",
           "--set", "training.gradient_accumulation_steps=1"]
    # the same global batch of 4: 4 on one process, 2 on each of two
    on_processes(run_stage, 1, "03_sft_train.py", *sft, "--set", "training.batch_size=4", "--run_id", "one")
    on_processes(run_stage, 2, "03_sft_train.py", *sft, "--set", "training.batch_size=2")
    one, two = run_stage.stage_dir("03_sft", "one"), run_stage.stage_dir("03_sft")
    manifest = read_manifest(two)
    assert manifest["status"] == "completed" and manifest["metrics"]["processes"] == 2
    assert manifest["metrics"]["steps"] == 1
    assert first_loss(two) == pytest.approx(first_loss(one), rel=1e-4)
    assert (two / "ckpt_sft" / "best" / "adapter_config.json").is_file()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    # 10: each process generates its share of the batches; the metrics and every prediction are those of one
    evaluation = ["--label", "sft", "--quick_test", "--set", "evaluation.max_examples=6"]  # 2 batches of <= 4
    on_processes(run_stage, 1, "10_evaluate.py", *evaluation, "--output_dir", str(run_stage.root / "eval_one"))
    on_processes(run_stage, 2, "10_evaluate.py", *evaluation)
    single = run_stage.root / "eval_one"
    double = run_stage.stage_dir("10_evaluation") / "sft"
    assert read_manifest(double)["status"] == "completed"
    assert read_manifest(double)["metrics"]["generation"]["processes"] == 2
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (single, double)]
    assert metrics[0]["n_examples"] == 6 and metrics[0] == metrics[1]
    predictions = [(folder / "samples" / "predictions.jsonl").read_text() for folder in (single, double)]
    assert predictions[0] == predictions[1]

    # GRPO: the step's 4 completions split 2 and 2, both processes' counted, one checkpoint
    on_processes(run_stage, 2, "06_train_grpo.py", "--quick_test", "--steps", "2", "--prompts_per_step", "2",
                 "--num_generations", "2", "--set", "algorithm.micro_batch_size=2")
    grpo = run_stage.stage_dir("06_grpo")
    metrics = read_manifest(grpo)["metrics"]
    assert metrics["processes"] == 2 and metrics["total_completions"] == 2 * 2 * 2
    assert metrics["groups_with_zero_reward_variance"]["per_step"] and len(
        metrics["groups_with_zero_reward_variance"]["per_step"]) == 2
    assert (grpo / "ckpt_grpo" / "final" / "adapter_config.json").is_file()
    assert [r["step"] for r in json.loads((grpo / "logs" / "training_log.json").read_text()) if "loss" in r] == [1, 2]
    on_processes(run_stage, 2, "07_train_rloo.py", "--quick_test", "--steps", "1", "--prompts_per_step", "2",
                 "--num_generations", "2", "--set", "algorithm.micro_batch_size=2")
    rloo = read_manifest(run_stage.stage_dir("07_rloo"))["metrics"]
    assert rloo["processes"] == 2 and rloo["total_completions"] == 4
    assert rloo["advantage_variance"]["n_steps"] == 1

    # 04 samples on both processes (one candidates file with every prompt), then 08 and DPO on two processes
    on_processes(run_stage, 2, "04_generate_candidates.py", "--quick_test", "--max_prompts", "6")
    candidates = run_stage.stage_dir("04_candidates")
    assert read_manifest(candidates)["metrics"]["processes"] == 2
    lines = (candidates / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(line)["candidates"]) >= 2 for line in lines)
    assert run_stage("08_build_prefs.py", "--quick_test") == 0
    on_processes(run_stage, 2, "09_train_dpo.py", "--quick_test", "--set", "algorithm.max_steps=1",
                 "--set", "training.batch_size=1", "--set", "training.gradient_accumulation_steps=1")
    dpo = run_stage.stage_dir("09_dpo")
    assert read_manifest(dpo)["metrics"]["processes"] == 2 and (dpo / "ckpt_dpo" / "final").is_dir()
    assert (dpo / "preference_eval.json").is_file()


def test_accelerate_configs_load_and_the_driver_reads_their_process_count():
    from accelerate.commands.config.config_args import ClusterConfig

    from utils.driver import DriverSettings

    paths = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert [p.stem for p in paths] == ["deepspeed_zero2", "multi_gpu", "single_gpu"]
    for path in paths:
        counted = ClusterConfig.from_yaml_file(path).num_processes  # accelerate's own reader accepts it
        # the multi-process configs leave the count to the command line (-1: accelerate launch wants
        # --num_processes); the rules in full: tests/test_launchers.py
        launcher = f"accelerate launch --config_file {path}" + (" --num_processes 2" if counted == -1 else "")
        settings = DriverSettings("c.yaml", "run", 42, False, launcher=launcher)
        assert settings.processes == (2 if counted == -1 else counted)

