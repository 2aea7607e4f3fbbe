"""Stages 03 (SFT), 04 (candidates) and 10 (evaluation) on the tiny model and synthetic data."""
import json

import pandas as pd

from utils.finqa_data import load_processed, write_jsonl
from utils.finqa_program import tokenize_program
from utils.metrics import aggregate, official_predictions, official_scores, score_items
from utils.reward import RewardCalculator
from utils.runs import read_manifest


def test_sft_candidates_and_evaluation(prepared):
    run = prepared
    assert run("03_sft_train.py", "--quick_test", "--max_steps", "2", "--set", "algorithm.eval_every_steps=1",
               "--set", "algorithm.save_every_steps=1") == 0
    sft = run.stage_dir("03_sft")
    manifest = read_manifest(sft)
    assert manifest["status"] == "completed" and manifest["metrics"]["steps"] == 2
    for folder in ("best", "final"):
        assert (sft / "ckpt_sft" / folder / "adapter_config.json").is_file()
    step_files = sorted((sft / "valid_samples").glob("step_*.json"))
    assert [p.name for p in step_files] == ["step_1.json", "step_2.json"]
    summary = json.loads(step_files[0].read_text())["summary"]
    assert set(summary) >= {"parse_rate", "mean_reward", "execution_accuracy"}
    log = json.loads((sft / "logs" / "training_log.json").read_text())
    assert any("loss" in record for record in log)

    assert run("04_generate_candidates.py", "--quick_test", "--num_candidates", "3") == 0
    cand = run.stage_dir("04_candidates")
    candidates = [json.loads(line) for line in (cand / "candidates.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (cand / "scores.jsonl").read_text().splitlines()]
    assert all(len(c["candidates"]) == 3 for c in candidates)
    assert len(scores) == 3 * len(candidates)
    assert {"total", "format_ok", "exec_match", "failure_reason"} <= set(scores[0])
    assert 0.0 <= read_manifest(cand)["metrics"]["parse_rate"] <= 1.0

    assert run("10_evaluate.py", "--label", "sft", "--quick_test") == 0
    ev = run.stage_dir("10_evaluation") / "sft"
    metrics = json.loads((ev / "metrics.json").read_text())
    for key in ("n_examples", "execution_accuracy", "program_accuracy", "numeric_accuracy", "format_compliance",
                "program_validity", "mean_reward"):
        assert key in metrics
    breakdown = pd.read_csv(ev / "breakdown.csv")
    assert len(breakdown) == metrics["n_examples"]
    assert set(breakdown["failure_reason"]) <= {"correct", "invalid_json", "invalid_program", "scale_error",
                                                "wrong_value"}
    official = json.loads((ev / "predictions_official.json").read_text())
    assert all(item["predicted"][-1] == "EOF" for item in official)

    # same checkpoint and seed -> same metrics
    assert run("10_evaluate.py", "--label", "sft", "--quick_test", "--output_dir", str(run.root / "again")) == 0
    again = json.loads((run.root / "again" / "metrics.json").read_text())
    assert {k: again[k] for k in metrics if k != "official_recheck"} == \
           {k: metrics[k] for k in metrics if k != "official_recheck"}

    # re-scoring the saved predictions gives the same numbers without a model
    assert run("10_evaluate.py", "--label", "rescored", "--predictions_jsonl",
               str(ev / "samples" / "predictions.jsonl"), "--quick_test") == 0
    rescored = json.loads((run.stage_dir("10_evaluation") / "rescored" / "metrics.json").read_text())
    for key in ("execution_accuracy", "program_accuracy", "format_compliance", "mean_reward"):
        assert rescored[key] == metrics[key]


def test_rescoring_known_predictions(prepared, tmp_path):
    run = prepared
    rows = load_processed(run.root / "processed" / "test.jsonl")[:4]
    completions = [
        json.dumps({"program": rows[0]["target_program"], "answer": "x"}),  # right
        "not json at all",                                                     # invalid JSON
        json.dumps({"program": "add(1, 2)", "answer": "3"}),                   # valid, wrong value
        json.dumps({"program": "frobnicate(1, 2)", "answer": "3"}),            # invalid program
    ]
    predictions = tmp_path / "preds.jsonl"
    write_jsonl(predictions, [{"id": r["id"], "completion": c} for r, c in zip(rows, completions)])
    assert run("10_evaluate.py", "--label", "known", "--predictions_jsonl", str(predictions),
               "--max_examples", "4") == 0
    folder = run.stage_dir("10_evaluation") / "known"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_examples"] == 4
    assert metrics["execution_accuracy"] == 0.25 and metrics["program_accuracy"] == 0.25
    assert metrics["format_compliance"] == 0.75 and metrics["program_validity"] == 0.5
    assert metrics["failure_reasons"] == {"correct": 1, "invalid_json": 1, "wrong_value": 1, "invalid_program": 1}
    official = json.loads((folder / "predictions_official.json").read_text())
    assert official[0] == {"id": rows[0]["id"], "predicted": tokenize_program(rows[0]["target_program"])}
    assert official[1]["predicted"] == ["EOF"]
    # the official-format file scores the same as metrics.json
    assert official_scores(official, rows) == {"execution_accuracy": 0.25, "program_accuracy": 0.25}
    # and the calculator agrees item by item
    records = score_items(rows, [{"completion": c} for c in completions], RewardCalculator())
    assert aggregate(records)["mean_reward"] == metrics["mean_reward"]
    assert official_predictions(records) == official


def test_evaluate_rejects_incomplete_predictions(prepared, tmp_path, capsys):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({"id": "nope", "completion": "{}"}) + "\n")
    assert prepared("10_evaluate.py", "--label", "bad", "--predictions_jsonl", str(predictions)) == 1
    assert "no prediction for" in capsys.readouterr().err


def test_sft_resume_continues_from_checkpoint(prepared):
    run = prepared
    common = ("--quick_test", "--skip_validation", "--set", "algorithm.save_every_steps=1")
    assert run("03_sft_train.py", *common, "--max_steps", "1") == 0
    sft = run.stage_dir("03_sft")
    # pretend the run was interrupted after its first checkpoint: the manifest is not 'completed'
    manifest = json.loads((sft / "manifest.json").read_text())
    manifest["status"] = "running"
    (sft / "manifest.json").write_text(json.dumps(manifest))
    assert run("03_sft_train.py", *common, "--max_steps", "2", "--resume") == 0
    log = json.loads((sft / "logs" / "training_log.json").read_text())
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2]  # step 1 from the first run, step 2 after resuming (not redone from 0)
    assert read_manifest(sft)["metrics"]["steps"] == 2
