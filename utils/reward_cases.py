"""Edge cases the reward must get right, with expectations worked out by hand from the rule in utils/reward.py
(DESIGN.md weights: exact +1.0, numeric within 5% +0.8, partial program 0.3 x fraction of gold steps, format
violation -0.2). 02_build_rewards.py runs them and records the results; the tests run them too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from utils.reward import RewardCalculator

TABLE = [
    ["", "2019", "2018"],
    ["revenue", "$ 5829", "5735"],
    ["net income", "1,200", "1,000 ( 3 )"],
    ["notes", "n/a", "see below"],
]
CHANGE = "subtract(5829, 5735), divide(#0, 5735)"  # executes to 94 / 5735 = 0.016390584...
CHANGE_ANS = 0.01639


def answer(program: str, value: str = "1.6%") -> str:
    return json.dumps({"program": program, "answer": value})


@dataclass
class RewardCase:
    name: str
    completion: str
    gold_program: str
    exe_ans: float | str
    expect: dict = field(default_factory=dict)  # RewardResult field -> expected value
    table: list = field(default_factory=lambda: TABLE)


CASES = [
    RewardCase("correct program", answer(CHANGE), CHANGE, CHANGE_ANS,
               {"failure_reason": "correct", "exec_match": True, "program_match": True, "total": 1.0}),
    RewardCase("equivalent program with commuted operands", answer("add(5735, 5829)", "11564"),
               "add(5829, 5735)", 11564.0, {"exec_match": True, "program_match": True, "total": 1.0}),
    RewardCase("right answer in the wrong scale (1.639 vs 0.01639, i.e. percent points)",
               answer(CHANGE + ", multiply(#1, const_100)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "scale_error", "scale_error": True, "exec_match": False,
                "numeric_match": False, "partial_program": 2 / 3, "total": 0.2}),
    RewardCase("wrong op in the first step", answer("add(5829, 5735), divide(#0, 5735)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "wrong_value", "exec_match": False, "partial_program": 0.5, "total": 0.15}),
    RewardCase("partial program (first step only)", answer("subtract(5829, 5735)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "wrong_value", "program_valid": True, "partial_program": 0.5, "total": 0.15}),
    RewardCase("numerically close (1.6% off), different program", answer("divide(94, 5829)"), CHANGE,
               CHANGE_ANS, {"exec_match": False, "numeric_match": True, "total": 0.8}),
    RewardCase("invalid JSON (prose)", "The answer is 1.6%.", CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False, "total": -0.2}),
    RewardCase("truncated JSON", '{"program": "subtract(5829, 57', CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False, "total": -0.2}),
    RewardCase("JSON without the answer field", json.dumps({"program": CHANGE}), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False, "total": -0.2}),
    RewardCase("empty output", "", CHANGE, CHANGE_ANS, {"failure_reason": "invalid_json", "total": -0.2}),
    RewardCase("unicode prose", "答案是 1.6% 🙂", CHANGE, CHANGE_ANS, {"failure_reason": "invalid_json",
                                                                      "total": -0.2}),
    RewardCase("JSON in a code fence", "```json\n" + answer(CHANGE) + "\n```", CHANGE, CHANGE_ANS,
               {"format_ok": True, "exec_match": True, "total": 1.0}),
    RewardCase("unknown op", answer("power(5829, 2)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "format_ok": True, "program_valid": False, "total": 0.0}),
    RewardCase("reference to a later step", answer("divide(#1, 5735), subtract(5829, 5735)"), CHANGE,
               CHANGE_ANS, {"failure_reason": "invalid_program", "program_valid": False}),
    RewardCase("division by zero", answer("divide(5829, 0)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "program_valid": False, "total": 0.0}),
    RewardCase("huge exponent does not hang", answer("exp(10, 1000000)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "program_valid": False, "total": 0.0}),
    RewardCase("table op on a row ($ and commas)", answer("table_sum(revenue, none)", "11564"),
               "table_sum(revenue, none)", 11564.0, {"failure_reason": "correct", "total": 1.0}),
    RewardCase("table op on a row with a footnote cell '1,000 ( 3 )'", answer("table_average(net income, none)"),
               "table_average(net income, none)", 1100.0, {"exec_match": True, "total": 1.0}),
    RewardCase("table op on a row with a non-number cell", answer("table_max(notes, none)"),
               "table_sum(revenue, none)", 11564.0, {"failure_reason": "invalid_program", "total": 0.0}),
    RewardCase("table op on a missing row", answer("table_max(profit, none)"), "table_sum(revenue, none)",
               11564.0, {"failure_reason": "invalid_program", "program_valid": False}),
    RewardCase("greater, right", answer("greater(5829, 5735)", "yes"), "greater(5829, 5735)", "yes",
               {"failure_reason": "correct", "total": 1.0}),
    RewardCase("greater, wrong", answer("greater(5735, 5829)", "yes"), "greater(5829, 5735)", "yes",
               {"failure_reason": "wrong_value", "numeric_match": False, "total": 0.0}),
    RewardCase("percent and constants", answer("divide(3.5%, const_100)", "0.035%"), "divide(3.5%, const_100)",
               0.00035, {"exec_match": True, "total": 1.0}),
    RewardCase("huge number literal", answer("multiply(1e308, 1e308)"), CHANGE, CHANGE_ANS,
               {"program_valid": False, "total": 0.0}),
]


def run_cases(calculator: RewardCalculator, cases: list[RewardCase] = CASES) -> list[dict]:
    """Each case with what the calculator returned and whether it met every expectation."""
    results = []
    for case in cases:
        result = calculator.score(case.completion, case.gold_program, case.exe_ans, case.table).to_dict()
        failed = {}
        for key, expected in case.expect.items():
            got = result.get(key)
            same = (abs(got - expected) < 1e-9 if isinstance(expected, float) and isinstance(got, (int, float))
                    else got == expected)
            if not same:
                failed[key] = {"expected": expected, "got": got}
        results.append({"name": case.name, "passed": not failed, "failed": failed, "result": result})
    return results


def case_table(cases: list[RewardCase] = CASES) -> list[dict]:
    return [asdict(case) for case in cases]
