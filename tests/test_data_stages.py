"""Stages 00-02 on synthetic FinQA-format data and the tiny model."""
import json

from utils.finqa_data import load_processed
from utils.runs import read_manifest


def test_check_prepare_and_rewards(run_stage, finqa_dir):
    # one broken entry in train: listed by id, not fatal
    train = json.loads((finqa_dir / "train.json").read_text())
    train[1]["qa"].pop("program")
    train[2]["qa"]["exe_ans"] = 123.0  # schema fine, but the gold program does not reproduce it
    (finqa_dir / "train.json").write_text(json.dumps(train))

    assert run_stage("00_check_data.py") == 0
    summary = json.loads((run_stage.stage_dir("00_data_validation") / "summary.json").read_text())
    train_summary = summary["splits"]["train"]
    assert train_summary["invalid_entries"] == [{"id": train[1]["id"], "reason": "missing or empty 'qa.program'"}]
    assert train_summary["gold_program_check"]["n_match_exe_ans"] == len(train) - 2
    assert [m["id"] for m in train_summary["gold_program_check"]["mismatches"]] == [train[2]["id"]]
    assert summary["splits"]["val"]["gold_program_check"]["n_match_exe_ans"] == 6
    assert set(summary["splits"]["train"]["op_histogram"]) >= {"subtract", "divide", "add", "table_sum", "greater"}

    assert run_stage("01_prepare_dataset.py") == 0
    manifest = read_manifest(run_stage.stage_dir("01_preprocessing"))
    assert manifest["status"] == "completed"
    assert {s["id"] for s in manifest["skipped_entries"]["train"]} == {train[1]["id"], train[2]["id"]}
    rows = load_processed(run_stage.root / "processed" / "train.jsonl")
    assert len(rows) == len(train) - 2
    row = rows[0]
    assert row["prompt"][0]["role"] == "system" and row["prompt"][1]["role"] == "user"
    assert json.loads(row["completion"][0]["content"]) == {"program": row["target_program"],
                                                           "answer": row["target_answer"]}
    assert "revenue" in row["input_text"] and row["table"][1][0] == "revenue"

    # a second run must not silently replace a completed stage or different processed files
    assert run_stage("01_prepare_dataset.py") == 1
    assert run_stage("01_prepare_dataset.py", "--run_id", "run_002", "--set", "data.context_mode=full") == 1
    assert run_stage("01_prepare_dataset.py", "--run_id", "run_002", "--set", "data.context_mode=full",
                     "--set", f"data.processed_dir={run_stage.root / 'full'}") == 0
    full = load_processed(run_stage.root / "full" / "train.jsonl")
    assert "Table:" in full[0]["input_text"] and "costs" in full[0]["input_text"]

    assert run_stage("02_build_rewards.py") == 0
    rewards = run_stage.stage_dir("02_rewards")
    results = json.loads((rewards / "unit_tests" / "test_results.json").read_text())
    assert results and all(r["passed"] for r in results)
    assert (rewards / "reward_spec.yaml").is_file()


def test_unusable_data_fails_with_one_line(run_stage, finqa_dir, capsys):
    good_dev = (finqa_dir / "dev.json").read_text()
    (finqa_dir / "dev.json").write_text("{not json")
    assert run_stage("00_check_data.py") == 1
    err = capsys.readouterr().err
    assert "dev.json: not valid JSON" in err
    assert read_manifest(run_stage.stage_dir("00_data_validation"))["status"] == "failed"
    (finqa_dir / "dev.json").write_text(json.dumps({"not": "a list"}))
    assert run_stage("00_check_data.py", "--run_id", "run_002") == 1
    capsys.readouterr()
    (finqa_dir / "dev.json").write_text(good_dev)
    (finqa_dir / "test.json").unlink()
    assert run_stage("01_prepare_dataset.py") == 1
    assert "FinQA file not found" in capsys.readouterr().err


def test_bad_flag_and_config_key(run_stage, capsys):
    assert run_stage("00_check_data.py", "--set", "data.nope=1") == 1
    assert "data.nope" in capsys.readouterr().err
