"""Issue 32, hostile files for scoring: a short prediction whose symbolic check would run for minutes, saved
predictions with odd counts or repeated ids, and metrics.json / breakdown.csv / training logs with numbers that
are not what 10 writes. Each gives a bounded answer or one `error:` line naming the file, never a traceback."""
import gc
import json
import signal
import threading
import time

import pandas as pd
import pytest

from conftest import one_error, run_script
from utils import finqa_program
from utils.finqa_data import load_processed, write_jsonl
from utils.finqa_program import equivalence, execute_program, program_accuracy, to_official_tokens


def hostile_program(a: str, b: str) -> str:
    """Against the gold add(a, b): 387 characters that took sympy's simplify 40 s before the time limit. The
    result is held as exe_ans (step 1 overflows on the real numbers, after step 0 computed a + b), so program
    accuracy reaches the symbolic check; the tower of powers at the end overflows at the three points where
    both programs are first evaluated, so no numeric verdict spares sympy; what sympy gets is a sum of six
    symbolic powers, to the 8th, over another sum: within the size and power bounds, slow to simplify."""
    return ", ".join([
        f"add({a}, {b})", f"exp({a}, {b})", f"exp({b}, {a})", f"exp(#0, {a})", f"exp(#0, {b})",
        f"subtract({a}, {b})", f"exp(#5, {a})", f"multiply({a}, {b})", f"exp(#7, {b})",
        "add(#1, #2)", "add(#9, #3)", "add(#10, #4)", "add(#11, #6)", "add(#12, #8)",
        "multiply(#13, #13)", "multiply(#14, #14)", "multiply(#15, #15)",
        f"add(#13, {a})", "multiply(#17, #17)", "divide(#16, #18)",
        "exp(#1, #1)", "exp(#20, #20)", "exp(#21, #21)", "add(#19, #22)"])


# ----------------------------------------------------------------------------------------------------------
# the symbolic check is bounded in time

def test_hostile_program_is_bounded_and_checked_once(monkeypatch):
    monkeypatch.setattr(finqa_program, "MAX_CHECK_SECONDS", 0.5)
    gold, pred = "add(5829, 5735)", hostile_program("5829", "5735")
    held = execute_program(pred, [])
    assert not held.valid and held.official_value == 11564.0  # so program accuracy asks sympy

    def outer_alarm(signum, frame):  # someone else's timer, e.g. a test timeout: it must survive the check
        raise AssertionError("the outer alarm fired during the check")

    previous = signal.signal(signal.SIGALRM, outer_alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        start = time.perf_counter()
        assert equivalence(pred, gold) == finqa_program.Equivalence(False, bounded=True)
        assert time.perf_counter() - start < 5
        # the official token list (10's second scoring route) gets the cached verdict, without a second check
        start = time.perf_counter()
        assert equivalence(to_official_tokens(pred), gold) == finqa_program.Equivalence(False, bounded=True)
        assert not program_accuracy(to_official_tokens(pred), gold, [], 11564.0)
        assert time.perf_counter() - start < 0.2
        assert signal.getsignal(signal.SIGALRM) is outer_alarm
        assert 20 < signal.getitimer(signal.ITIMER_REAL)[0] < 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_hostile_program_is_bounded_outside_the_main_thread(monkeypatch):
    # no signal reaches a worker thread: a watchdog thread raises the limit into it, again and again, since one
    # that lands in a gc callback (Python ignores it there; pytest installs one) is lost; this test's callback
    # runs Python code, so that landings there happen
    monkeypatch.setattr(finqa_program, "MAX_CHECK_SECONDS", 0.5)

    def slow_callback(phase, info):
        [time.sleep(0.001) for _ in range(3)]

    answer = {}

    def check():
        start = time.perf_counter()
        answer["hostile"] = equivalence(hostile_program("4273.1", "6.9%"), "add(4273.1, 6.9%)")
        answer["seconds"] = time.perf_counter() - start
        # a check that fits the limit gets its answer
        answer["commuted"] = equivalence("add(4273.1, 6.9%), divide(#0, 4273.1)",
                                         "add(6.9%, 4273.1), divide(#0, 4273.1)")

    gc.callbacks.append(slow_callback)  # (gc reads its own list: patching the attribute would not reach it)
    try:
        worker = threading.Thread(target=check)
        worker.start()
        worker.join(60)
    finally:
        gc.callbacks.remove(slow_callback)
    assert answer["hostile"] == finqa_program.Equivalence(False, bounded=True) and answer["seconds"] < 5
    assert answer["commuted"] == finqa_program.Equivalence(True)


def test_evaluate_bounds_a_hostile_prediction(prepared):
    rows = load_processed(prepared.root / "processed" / "test.jsonl")
    target = next(row for row in rows if row["target_program"].startswith("add("))
    a, b = target["target_program"][4:-1].split(", ")
    lines = []
    for row in rows:
        program = hostile_program(a, b) if row is target else row["target_program"]
        lines.append({"id": row["id"], "completion": json.dumps({"program": program, "answer": "x"})})
    hostile_line = json.dumps(lines[rows.index(target)])
    assert len(hostile_line) < 1024
    predictions = prepared.root / "predictions.jsonl"
    write_jsonl(predictions, lines)

    start = time.perf_counter()
    assert prepared("10_evaluate.py", "--label", "hostile", "--predictions_jsonl", str(predictions)) == 0
    assert time.perf_counter() - start < 15  # 80 s before (40 s in each of 10's two scoring routes)
    folder = prepared.stage_dir("10_evaluation") / "hostile"
    metrics = json.loads((folder / "metrics.json").read_text())
    n = len(rows)
    assert metrics["program_check_bounded"] == 1
    assert metrics["program_accuracy"] == round((n - 1) / n, 5)  # counted as not equivalent, in both routes
    assert metrics["official_recheck"]["program_accuracy"] == metrics["program_accuracy"]
    breakdown = pd.read_csv(folder / "breakdown.csv", dtype={"id": str}).set_index("id")
    assert breakdown.loc[target["id"], "program_check_bounded"] and not breakdown.loc[target["id"], "program_match"]
    assert breakdown["program_check_bounded"].sum() == 1


# ----------------------------------------------------------------------------------------------------------
# 10's saved predictions

def test_saved_predictions_with_bad_counts_or_repeated_ids(prepared, tmp_path, capsys):
    rows = load_processed(prepared.root / "processed" / "test.jsonl")
    good = [json.dumps({"id": row["id"], "completion": json.dumps({"program": row["target_program"], "answer": "x"}),
                        "n_tokens": 12, "finish_reason": "stop"}) for row in rows]
    first = json.loads(good[0])
    cases = [  # (line 2 of the file, what the error names)
        (json.dumps({**first, "completion": "other"}), f"prediction id {first['id']!r} again (first on line 1)"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": NaN'), "'n_tokens' is nan"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": Infinity'), "'n_tokens' is inf"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": -1'), "'n_tokens' is -1"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": 1.5'), "'n_tokens' is 1.5"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": "12"'), "'n_tokens' is '12'"),
        (good[0].replace('"n_tokens": 12', '"n_tokens": true'), "'n_tokens' is True"),
        (good[0].replace('"finish_reason": "stop"', '"finish_reason": 5'), "'finish_reason' is 5"),
    ]
    path = tmp_path / "predictions.jsonl"
    for index, (line, needle) in enumerate(cases):
        path.write_text("\n".join([good[0], line, *good[1:]]) + "\n")
        assert prepared("10_evaluate.py", "--label", f"bad{index}", "--predictions_jsonl", str(path)) == 1
        one_error(capsys, "predictions.jsonl:2", needle)
    # an identical repeated line is the same prediction; 12.0 tokens is 12 tokens
    path.write_text("\n".join([good[0], good[0].replace('"n_tokens": 12', '"n_tokens": 12.0'), *good[1:]]) + "\n")
    assert prepared("10_evaluate.py", "--label", "repeated", "--predictions_jsonl", str(path)) == 0
    metrics = json.loads((prepared.stage_dir("10_evaluation") / "repeated" / "metrics.json").read_text())
    assert metrics["mean_completion_tokens"] == 12 and metrics["n_examples"] == len(rows)


# ----------------------------------------------------------------------------------------------------------
# 11 reads numbers back from disk

def write_evaluation(root, metrics: dict | None = None, rows: list[dict] | None = None, raw_metrics: str | None = None):
    """A completed-looking evaluation run_x/10_evaluation/sft with a metrics.json and a breakdown.csv."""
    folder = root / "run_x" / "10_evaluation" / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    base = {"n_examples": 4, "execution_accuracy": 0.5, "program_accuracy": 0.25, "numeric_accuracy": 0.5,
            "format_compliance": 1.0, "program_validity": 0.75, "scale_error_rate": 0.0, "mean_reward": 0.6,
            "program_check_bounded": 0, "mean_completion_tokens": 20.5, "label": "sft",
            "official_recheck": {"execution_accuracy": 0.5, "program_accuracy": 0.25}}
    (folder / "metrics.json").write_text(raw_metrics if raw_metrics is not None else
                                         json.dumps({**base, **(metrics or {})}))
    items = [{"id": f"item_{i}", "format_ok": True, "program_valid": i != 3, "exec_match": i < 2,
              "program_match": i < 1, "program_check_bounded": False, "numeric_match": i < 2, "scale_error": False,
              "reward": 1.0 if i < 2 else 0.2, "n_tokens": 20 + i} for i in range(4)]
    for index, changes in enumerate(rows or []):
        items[index].update(changes)
    pd.DataFrame(items).to_csv(folder / "breakdown.csv", index=False)
    return root / "run_x"


def compare(run_dir, out) -> int:
    return run_script("11_compare_runs.py", str(run_dir), "--output_dir", str(out))


def test_compare_accepts_the_well_formed_evaluation(tmp_path):
    assert compare(write_evaluation(tmp_path), tmp_path / "cmp") == 0
    summary = pd.read_csv(tmp_path / "cmp" / "summary.csv")
    assert summary["execution_accuracy"].tolist() == [0.5]


@pytest.mark.parametrize("changes, needle", [
    ({"execution_accuracy": 1.5}, "'execution_accuracy' is 1.5, not a rate in [0, 1]"),
    ({"program_validity": -0.25}, "'program_validity' is -0.25, not a rate in [0, 1]"),
    ({"n_examples": 0}, "'n_examples' is 0, not a whole number >= 1"),
    ({"n_examples": 2.5}, "'n_examples' is 2.5, not a whole number >= 1"),
    ({"n_examples": True}, "'n_examples' is True, not a number"),
])
def test_metrics_out_of_range(tmp_path, capsys, changes, needle):
    assert compare(write_evaluation(tmp_path, changes), tmp_path / "cmp") == 1
    one_error(capsys, "metrics.json", needle)


@pytest.mark.parametrize("text, needle", [
    ('"execution_accuracy": Infinity', "'execution_accuracy' is inf, not a finite number"),
    ('"execution_accuracy": NaN', "'execution_accuracy' is nan, not a finite number"),
    ('"mean_reward": -Infinity', "'mean_reward' is -inf, not a finite number"),
    ('"mean_completion_tokens": NaN', "'mean_completion_tokens' is nan, not a finite number"),
    ('"official_recheck": {"program_accuracy": Infinity}', "'official_recheck.program_accuracy' is inf"),
    ('"mean_completion_tokens": 1' + "0" * 400, "'mean_completion_tokens' is 1000"),
])
def test_metrics_that_are_not_finite(tmp_path, capsys, text, needle):
    raw = '{"n_examples": 4, "execution_accuracy": 0.5, ' + text + "}"  # (Python's json reads these literals)
    assert compare(write_evaluation(tmp_path, raw_metrics=raw), tmp_path / "cmp") == 1
    one_error(capsys, "metrics.json", needle)


def test_metrics_with_integers_past_the_digit_limit(tmp_path, capsys):
    raw = '{"n_examples": 4, "execution_accuracy": 0.5, "mean_reward": 1' + "0" * 5000 + "}"
    assert compare(write_evaluation(tmp_path, raw_metrics=raw), tmp_path / "cmp") == 1
    one_error(capsys, "metrics.json", "not a readable metrics.json file")


@pytest.mark.parametrize("changes, needle", [
    ({"exec_match": "maybe"}, "row 3 (id 'item_2'): 'exec_match' is 'maybe', not True or False"),
    ({"program_valid": 2}, "row 3 (id 'item_2'): 'program_valid' is '2', not True or False"),
    ({"format_ok": None}, "row 3 (id 'item_2'): 'format_ok' is nan, not True or False"),
    ({"reward": "high"}, "row 3 (id 'item_2'): 'reward' is 'high', not a finite number"),
    ({"reward": float("inf")}, "row 3 (id 'item_2'): 'reward' is inf, not a finite number"),
    ({"n_tokens": 2.5}, "row 3 (id 'item_2'): 'n_tokens' is 2.5, not a whole number of tokens or empty"),
    ({"n_tokens": "many"}, "row 3 (id 'item_2'): 'n_tokens' is 'many', not a whole number of tokens or empty"),
])
def test_breakdown_cells_of_the_wrong_kind(tmp_path, capsys, changes, needle):
    run_dir = write_evaluation(tmp_path, rows=[{}, {}, changes])
    assert compare(run_dir, tmp_path / "cmp") == 1
    one_error(capsys, "breakdown.csv", needle)


def test_breakdown_without_token_counts_is_fine(tmp_path):
    run_dir = write_evaluation(tmp_path, rows=[{"n_tokens": None}] * 4)
    assert compare(run_dir, tmp_path / "cmp") == 0


def test_unreadable_training_log_is_left_out(tmp_path, capsys):
    run_dir = write_evaluation(tmp_path)
    sft = run_dir / "03_sft"
    (sft / "logs").mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"stage": "03_sft_train", "status": "completed", "seed": 1}))
    (sft / "logs" / "training_log.json").write_text('[{"step": 1, "loss": 1' + "0" * 5000 + "}]")
    assert compare(run_dir, tmp_path / "cmp") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "training_log.json: not a readable training log file" in err
    (sft / "logs" / "training_log.json").write_text("5")
    assert compare(run_dir, tmp_path / "cmp2") == 0
    assert "a training log is a list of records" in capsys.readouterr().err
