"""Evaluation metrics (docs/design.md: metrics.json), the per-item breakdown and FinQA's leaderboard format.

Every figure comes from the one reward calculator, so evaluation, RL rewards and candidate scores agree.
predictions_official.json holds each prediction as FinQA's program tokens; official_scores() re-scores that
file the way FinQA's evaluate.py does (execute the tokens; program accuracy = symbolic equivalence and the
right result), and 10_evaluate.py checks both routes give the same numbers.
"""
from __future__ import annotations

from collections import Counter

import pandas as pd

from utils.finqa_program import execute_program, execution_match, program_accuracy, tokenize_program
from utils.reward import RewardCalculator

BREAKDOWN_COLUMNS = ["id", "prediction", "program", "executed_value", "exe_ans", "gold_program", "format_ok",
                     "program_valid", "exec_match", "program_match", "program_check_bounded", "numeric_match",
                     "scale_error", "partial_program", "reward", "failure_reason", "n_tokens", "finish_reason"]
BREAKDOWN_BOOLEANS = ("format_ok", "program_valid", "exec_match", "program_match", "program_check_bounded",
                      "numeric_match", "scale_error")
# metrics.json's rates: the share of items whose breakdown column is True
RATES = {"execution_accuracy": "exec_match", "program_accuracy": "program_match", "numeric_accuracy": "numeric_match",
         "format_compliance": "format_ok", "program_validity": "program_valid", "scale_error_rate": "scale_error"}
MAX_TOKEN_COUNT = 2 ** 53  # the largest count a float (the mean, pandas' column) still holds exactly


def is_token_count(value) -> bool:
    """A completion's token count: a whole number from 0 to MAX_TOKEN_COUNT (12.0 is one; True, NaN are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (isinstance(value, int) or value.is_integer()) and 0 <= value <= MAX_TOKEN_COUNT


def score_items(rows: list[dict], predictions: list[dict], calculator: RewardCalculator) -> list[dict]:
    """One record per example. predictions: {"id", "completion", optional "n_tokens", "finish_reason"}."""
    records = []
    for row, prediction in zip(rows, predictions):
        result = calculator.score_example(prediction["completion"], row)
        records.append({
            "id": row["id"], "prediction": prediction["completion"], "program": result.program,
            "executed_value": result.executed_value, "exe_ans": row["exe_ans"],
            "gold_program": row["target_program"], "format_ok": result.format_ok,
            "program_valid": result.program_valid, "exec_match": result.exec_match,
            "program_match": result.program_match, "program_check_bounded": result.program_check_bounded,
            "numeric_match": result.numeric_match,
            "scale_error": result.scale_error, "partial_program": result.partial_program,
            "reward": result.total, "failure_reason": result.failure_reason,
            "n_tokens": prediction.get("n_tokens"), "finish_reason": prediction.get("finish_reason"),
        })
    return records


def aggregate(records: list[dict]) -> dict:
    n = len(records)

    def rate(key: str) -> float:
        return round(sum(bool(r[key]) for r in records) / n, 5) if n else 0.0

    tokens = [r["n_tokens"] for r in records if r.get("n_tokens") is not None]
    return {
        "n_examples": n,
        **{name: rate(column) for name, column in RATES.items()},
        # items whose program accuracy a bound of utils.finqa_program decided (counted as not equivalent)
        "program_check_bounded": sum(bool(r["program_check_bounded"]) for r in records),
        "mean_reward": round(sum(r["reward"] for r in records) / n, 5) if n else 0.0,
        "mean_partial_program": round(sum(r["partial_program"] for r in records) / n, 5) if n else 0.0,
        "failure_reasons": dict(Counter(r["failure_reason"] for r in records).most_common()),
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
    }


def official_predictions(records: list[dict]) -> list[dict]:
    """FinQA's leaderboard format: [{"id", "predicted": [program tokens..., "EOF"]}]. An answer whose JSON
    could not be read has no program: ["EOF"], which the official script counts as wrong."""
    return [{"id": r["id"], "predicted": tokenize_program(r["program"]) if r["format_ok"] and r["program"]
             else ["EOF"]} for r in records]


def official_scores(official: list[dict], rows: list[dict]) -> dict:
    """Execution and program accuracy of a leaderboard file against the gold rows, by FinQA's rules."""
    gold = {row["id"]: row for row in rows}
    exe_correct = prog_correct = 0
    for item in official:
        row = gold[item["id"]]
        if execution_match(execute_program(item["predicted"], row["table"]), row["exe_ans"]):
            exe_correct += 1
        if program_accuracy(item["predicted"], row["target_program"], row["table"], row["exe_ans"]):
            prog_correct += 1
    n = max(len(official), 1)
    return {"execution_accuracy": round(exe_correct / n, 5), "program_accuracy": round(prog_correct / n, 5)}


def breakdown_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=BREAKDOWN_COLUMNS)
