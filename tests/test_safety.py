"""Issue 17: a stage only ever deletes or replaces its own folder, labels and run ids are plain names, default
inputs come from completed stages, and every bad input gives one `error:` line (never a traceback)."""
import json
import time
from pathlib import Path

import pytest

from conftest import one_error, run_script
from utils.contexts import full_context
from utils.finqa_data import PROCESSED_SET, load_processed, write_jsonl
from utils.models import load_tokenizer
from utils.runs import read_json, read_manifest, sha256_file, write_json_atomic


def user_folder(path: Path) -> dict:
    """A folder of the user's own files, and what it holds (to check it is left untouched)."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "notes" / "a.txt").write_text("keep me")
    return snapshot(path)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# data loss

@pytest.mark.parametrize("script, extra", [("02_build_rewards.py", ()), ("00_check_data.py", ("--finqa_dir", "/missing")),
                                           ("11_compare_runs.py", ())])
def test_output_dir_of_user_files_is_refused(run_stage, tmp_path, capsys, script, extra):
    folder = tmp_path / "mine"
    before = user_folder(folder)
    if script == "11_compare_runs.py":  # 11 has no model flags; it needs an evaluation to compare
        assert run_stage("01_prepare_dataset.py") == 0
        assert run_stage("10_evaluate.py", "--base", "--quick_test") == 0
        capsys.readouterr()
        code = run_script(script, str(run_stage.root / "outputs" / "run_001"), "--output_dir", str(folder))
    else:
        code = run_stage(script, "--output_dir", str(folder), *extra)
    assert code == 1
    one_error(capsys, str(folder), "only replaces its own folder")
    assert snapshot(folder) == before  # nothing deleted or written
    # --overwrite does not change that, and neither does a folder that looks like the repository
    repo_like = tmp_path / "repo"
    before = user_folder(repo_like)
    (repo_like / ".git").mkdir()
    assert run_stage("02_build_rewards.py", "--output_dir", str(repo_like), "--overwrite") == 1
    one_error(capsys, "only replaces its own folder")
    assert snapshot(repo_like) == before and (repo_like / ".git").is_dir()


def test_another_stages_folder_is_never_replaced(prepared, capsys):
    rewards = prepared.stage_dir("02_rewards")
    before = snapshot(rewards)
    assert prepared("00_check_data.py", "--output_dir", str(rewards), "--overwrite") == 1
    one_error(capsys, "another stage (02_build_rewards)")
    assert snapshot(rewards) == before


@pytest.mark.parametrize("label", ["..", "../..", "/abs/path", "../../x", "a/b", ".hidden", "x" * 101])
def test_labels_are_plain_names(prepared, capsys, label):
    outputs = prepared.root / "outputs"
    before = snapshot(outputs)
    assert prepared("10_evaluate.py", "--base", "--label", label, "--quick_test") == 1
    one_error(capsys, "--label must be a plain name")
    assert snapshot(outputs) == before
    assert not Path("/abs/path").exists()


def test_run_id_is_a_plain_name(run_stage, capsys):
    assert run_stage("02_build_rewards.py", "--run_id", "r" * 300) == 1
    one_error(capsys, "--run_id must be a plain name")
    assert run_stage("02_build_rewards.py", "--run_id", "../escape") == 1
    one_error(capsys, "--run_id")


def test_evaluation_needs_a_completed_stage(prepared, capsys):
    sft = prepared.stage_dir("03_sft")
    (sft / "ckpt_sft" / "best").mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"stage": "03_sft_train", "status": "running"}))
    assert prepared("10_evaluate.py", "--label", "sft", "--quick_test") == 1
    one_error(capsys, "03_sft is not a completed stage")
    assert not (prepared.stage_dir("10_evaluation") / "sft" / "metrics.json").exists()


def test_overwrite_keeps_the_old_result_until_the_new_one_completes(prepared, capsys, tmp_path):
    rewards = prepared.stage_dir("02_rewards")
    before = snapshot(rewards)
    # a re-run with a typo: the completed result is still there, completed
    assert prepared("02_build_rewards.py", "--overwrite", "--reward_spec", str(tmp_path / "typo.yaml")) == 1
    one_error(capsys, "typo.yaml")
    assert snapshot(rewards) == before and read_manifest(rewards)["status"] == "completed"
    assert not any(p.name.endswith(".previous") for p in rewards.parent.iterdir())
    # a bad value is refused before anything is touched
    assert prepared("02_build_rewards.py", "--overwrite", "--set", "data.context_mode=weird") == 1
    one_error(capsys, "data.context_mode")
    assert snapshot(rewards) == before
    # a good re-run replaces it and leaves nothing behind
    spec = tmp_path / "spec.yaml"
    spec.write_text("weights: {exact: 2.0, numeric: 0.5, partial_program: 0.1, format_violation: -1.0}\n")
    assert prepared("02_build_rewards.py", "--overwrite", "--reward_spec", str(spec)) == 0
    assert read_manifest(rewards)["inputs"]["reward_spec"]["path"] == str(spec)
    assert not any(p.name.endswith(".previous") for p in rewards.parent.iterdir())


def test_interrupted_replacement_is_recoverable(prepared):
    # kill -9 during a replacement leaves the earlier result aside; the next completed run removes it, a
    # failed one puts it back
    rewards = prepared.stage_dir("02_rewards")
    previous = rewards.parent / ".02_rewards.previous"
    rewards.rename(previous)
    rewards.mkdir()
    (rewards / "manifest.json").write_text(json.dumps({"stage": "02_build_rewards", "status": "running"}))
    assert prepared("02_build_rewards.py", "--reward_spec", "/missing.yaml") == 1
    assert read_manifest(rewards)["status"] == "completed" and not previous.exists()


# ----------------------------------------------------------------------------------------------------------
# one error line

def test_unreadable_raw_and_processed_files(run_stage, finqa_dir, capsys, tmp_path):
    (finqa_dir / "dev.json").write_text("[" * 100_000 + "]" * 100_000)
    assert run_stage("00_check_data.py") == 1
    one_error(capsys, "dev.json", "nested too deeply")
    assert run_stage("00_check_data.py", "--run_id", "run_002", "--finqa_dir", str(tmp_path / "nothing")) == 1
    one_error(capsys, "FinQA file not found")

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: not UTF-8"):
        load_processed(bad)


def test_duplicate_ids(run_stage, finqa_dir, capsys):
    train = json.loads((finqa_dir / "train.json").read_text())
    train[3]["id"] = train[0]["id"]
    (finqa_dir / "train.json").write_text(json.dumps(train))
    assert run_stage("00_check_data.py") == 0
    summary = json.loads((run_stage.stage_dir("00_data_validation") / "summary.json").read_text())
    assert summary["splits"]["train"]["duplicate_ids"] == [train[0]["id"]]
    assert run_stage("01_prepare_dataset.py") == 1
    one_error(capsys, "train.json", train[0]["id"], "an id must name one example")


def test_test_split_is_never_made_smaller(run_stage, finqa_dir, capsys):
    test = json.loads((finqa_dir / "test.json").read_text())
    train = json.loads((finqa_dir / "train.json").read_text())
    test[0]["qa"]["exe_ans"] = 123.0  # its gold program does not reproduce it: still evaluated (FinQA counts it)
    train[0]["qa"]["exe_ans"] = 123.0  # ... but not trained on
    (finqa_dir / "test.json").write_text(json.dumps(test))
    (finqa_dir / "train.json").write_text(json.dumps(train))
    assert run_stage("01_prepare_dataset.py") == 0
    manifest = read_manifest(run_stage.stage_dir("01_preprocessing"))
    assert len(load_processed(run_stage.root / "processed" / "test.jsonl")) == len(test)
    assert manifest["gold_not_reproducing"]["test"] == [test[0]["id"]]
    assert [s["id"] for s in manifest["skipped_entries"]["train"]] == [train[0]["id"]]
    assert run_stage("10_evaluate.py", "--base", "--quick_test", "--set", "evaluation.max_examples=null") == 0
    metrics = json.loads((run_stage.stage_dir("10_evaluation") / "base" / "metrics.json").read_text())
    assert metrics["n_examples"] == len(test)
    # an entry that cannot be prompted in test is an error naming it, never a smaller split
    test[1]["qa"].pop("question")
    (finqa_dir / "test.json").write_text(json.dumps(test))
    assert run_stage("01_prepare_dataset.py", "--run_id", "run_002", "--overwrite") == 1
    one_error(capsys, "test.json", test[1]["id"], "never made smaller")


@pytest.mark.parametrize("field, value", [("table", 5), ("exe_ans", {}), ("target_program", None),
                                          ("prompt", "text"), ("id", 7)])
def test_processed_rows_with_wrong_types_are_rejected(prepared, capsys, field, value):
    path = prepared.root / "processed" / "test.jsonl"
    rows = load_processed(path)
    rows[2][field] = value
    write_jsonl(path, rows)
    # (a file that no longer matches processed_set.json is refused before its rows are read)
    assert prepared("10_evaluate.py", "--base", "--quick_test") == 1
    one_error(capsys, str(path), "does not match the processed set")
    record = read_json(path.parent / PROCESSED_SET)  # a set whose rows are bad, as 01 itself could never write
    record["splits"]["test"]["sha256"] = sha256_file(path)
    write_json_atomic(path.parent / PROCESSED_SET, record)
    assert prepared("10_evaluate.py", "--base", "--quick_test") == 1
    one_error(capsys, "test.jsonl:3", f"'{field}'")


def test_predictions_that_are_not_utf8(prepared, capsys, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_bytes(b'{"id": "x", "completion": "\xc3\x28"}\n')
    assert prepared("10_evaluate.py", "--label", "p", "--predictions_jsonl", str(predictions)) == 1
    one_error(capsys, "predictions.jsonl:1", "not UTF-8")


def test_reward_spec_that_is_not_a_mapping(run_stage, capsys, tmp_path):
    spec = tmp_path / "list.yaml"
    spec.write_text("- 1\n- 2\n")
    assert run_stage("02_build_rewards.py", "--reward_spec", str(spec)) == 1
    one_error(capsys, "list.yaml", "must be a mapping")


def test_reward_spec_with_other_weights_passes_its_edge_cases(run_stage, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("weights: {exact: 1.5, numeric: 0.6, partial_program: 0.5, format_violation: -0.5}\n"
                    "numeric_tolerance: 0.01\n")
    assert run_stage("02_build_rewards.py", "--reward_spec", str(spec)) == 0
    results = json.loads((run_stage.stage_dir("02_rewards") / "unit_tests" / "test_results.json").read_text())
    assert all(r["passed"] for r in results)
    by_name = {r["name"]: r["result"] for r in results}
    assert by_name["correct program"]["total"] == 1.5 and by_name["invalid JSON (prose)"]["total"] == -0.5
    assert by_name["numerically close (1.6% off), different program"]["numeric_match"] is False  # 1.6% > 1%


def test_policy_checkpoints_that_are_not_checkpoints(prepared, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken_adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    for ckpt, needle in ((Path("/etc"), "not a checkpoint"), (empty, "not a checkpoint"),
                         (broken, "adapter_config.json"), (no_weights, "without weights"),
                         (Path("/proc/self"), "not a checkpoint"), (tmp_path / "missing", "not found")):
        started = time.time()
        assert prepared("10_evaluate.py", "--label", "x", "--policy_ckpt", str(ckpt), "--quick_test") == 1
        one_error(capsys, "--policy_ckpt", str(ckpt), needle)
        assert time.time() - started < 30  # /proc and /etc are never read through
    assert prepared("04_generate_candidates.py", "--policy_ckpt", str(broken), "--quick_test") == 1
    one_error(capsys, "--policy_ckpt", "adapter_config.json")


def test_model_folder_without_weights_or_tokenizer(run_stage, capsys, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert run_stage("01_prepare_dataset.py", "--set", f"model.path={folder}") == 1
    one_error(capsys, "model.path", "no tokenizer")


@pytest.mark.parametrize("script, flags, needle", [
    ("03_sft_train.py", ("--batch_size", "0"), "--batch_size"),
    ("03_sft_train.py", ("--learning_rate", "-1"), "--learning_rate"),
    ("06_train_grpo.py", ("--steps", "0"), "--steps"),
    ("05_train_ppo.py", ("--ppo_epochs", "0"), "--ppo_epochs"),
    ("09_train_dpo.py", ("--learning_rate", "0"), "--learning_rate"),
    ("04_generate_candidates.py", ("--num_candidates", "0"), "--num_candidates"),
    ("10_evaluate.py", ("--base", "--max_examples", "-1"), "--max_examples"),
    ("10_evaluate.py", ("--base", "--max_examples", "0"), "--max_examples"),
    ("01_prepare_dataset.py", ("--set", "data.context_mode=weird"), "data.context_mode"),
    ("03_sft_train.py", ("--set", "generation.top_p=2"), "generation.top_p"),
])
def test_bad_values_are_rejected_before_the_model_loads(run_stage, capsys, script, flags, needle):
    # model.path points nowhere: a value error must come first
    assert run_stage(script, *flags, "--set", "model.path=/nonexistent/model") == 1
    one_error(capsys, needle)


def test_corrupt_candidates_for_preferences(prepared, capsys):
    folder = prepared.stage_dir("04_candidates")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": "04_generate_candidates", "status": "completed"}))
    prompt = [{"role": "user", "content": "q"}]
    good_score = {"id": "a", "index": 0, "total": 1.0, "exec_match": True}
    cases = [
        ([{"id": "a", "prompt": prompt}], [good_score], "candidates.jsonl:1", "'candidates'"),
        ([{"id": "a", "prompt": prompt, "candidates": [None]}], [good_score], "candidates.jsonl:1", "'candidates'"),
        ([{"id": "a", "prompt": prompt, "candidates": ["x"]}], [{"id": "a", "total": 1.0}], "scores.jsonl:1",
         "'index'"),
        ([{"id": "a", "prompt": prompt, "candidates": ["x"]}], [{**good_score, "total": "high"}], "scores.jsonl:1",
         "'total'"),
    ]
    for run_id, (candidates, scores, where, needle) in enumerate(cases):
        write_jsonl(folder / "candidates.jsonl", candidates)
        write_jsonl(folder / "scores.jsonl", scores)
        assert prepared("08_build_prefs.py", "--output_dir", str(prepared.root / f"prefs_{run_id}")) == 1
        one_error(capsys, where, needle)


def test_metrics_with_strings_for_numbers(capsys, tmp_path):
    folder = tmp_path / "run_x" / "10_evaluation" / "sft"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"execution_accuracy": "0.5", "n_examples": 10}))
    assert run_script("11_compare_runs.py", str(tmp_path / "run_x"), "--output_dir", str(tmp_path / "cmp")) == 1
    one_error(capsys, "metrics.json", "'execution_accuracy' is '0.5', not a number")


def test_full_context_is_linear_in_the_table(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)

    def count(lines):
        return [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]] if lines else []

    entry = {"pre_text": ["revenue grew ."] * 100, "post_text": ["costs fell ."] * 100,
             "table": [["", "2019", "2018"]] + [[f"row {i}", "1,000", "2,000"] for i in range(10_000)]}
    started = time.time()
    context = full_context(entry, count, 640).text
    assert time.time() - started < 10
    lines = context.splitlines()
    assert lines[0] == "Table:" and len(lines) > 10 and sum(count(lines)) + len(lines) <= 640
