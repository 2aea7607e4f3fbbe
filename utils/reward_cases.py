"""Edge cases the reward must get right, with expectations worked out by hand from the rule in utils/reward.py.

Each case names which weight pays and by what factor (`pays`: ("exact", 1), ("partial_program", 2/3), ...), so the
expected total follows from whatever weights reward_spec.yaml holds (docs/design.md's: exact +1.0, numeric within 5%
+0.8, partial program 0.3 x fraction of gold steps, format violation -0.2). 02_build_rewards.py runs them under
its spec and records the results; the tests run them too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from utils.reward import RewardCalculator, RewardWeights

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
    expect: dict = field(default_factory=dict)  # RewardResult field -> expected value (the total: see pays)
    pays: tuple = ("partial_program", 0.0)      # (weight name, factor): expected total = weight * factor
    table: list = field(default_factory=lambda: TABLE)
    # For a result near exe_ans: its relative error. Within the spec's numeric_tolerance the case expects a
    # numeric match paid by `pays`; outside it, no numeric match, paid by `pays_if_far`.
    numeric_error: float | None = None
    pays_if_far: tuple = ("partial_program", 0.0)

    def expectations(self, weights: RewardWeights) -> dict:
        """What the result must hold under these weights, the total included."""
        expect, pays = dict(self.expect), self.pays
        if self.numeric_error is not None and self.numeric_error > weights.numeric_tolerance:
            expect["numeric_match"], pays = False, self.pays_if_far
        name, factor = pays
        return {**expect, "total": getattr(weights, name) * factor}


EXACT, NUMERIC, FORMAT = ("exact", 1.0), ("numeric", 1.0), ("format_violation", 1.0)


def partial(fraction: float) -> tuple:
    return ("partial_program", fraction)


CASES = [
    RewardCase("correct program", answer(CHANGE), CHANGE, CHANGE_ANS,
               {"failure_reason": "correct", "exec_match": True, "program_match": True}, EXACT),
    RewardCase("equivalent program with commuted operands", answer("add(5735, 5829)", "11564"),
               "add(5829, 5735)", 11564.0, {"exec_match": True, "program_match": True}, EXACT),
    RewardCase("right answer in the wrong scale (1.639 vs 0.01639, i.e. percent points)",
               answer(CHANGE + ", multiply(#1, const_100)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "scale_error", "scale_error": True, "exec_match": False,
                "numeric_match": False, "partial_program": 2 / 3}, partial(2 / 3)),
    RewardCase("wrong op in the first step", answer("add(5829, 5735), divide(#0, 5735)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "wrong_value", "exec_match": False, "partial_program": 0.5}, partial(0.5)),
    RewardCase("partial program (first step only)", answer("subtract(5829, 5735)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "wrong_value", "program_valid": True, "partial_program": 0.5}, partial(0.5)),
    RewardCase("numerically close (1.6% off), different program", answer("divide(94, 5829)"), CHANGE,
               CHANGE_ANS, {"exec_match": False, "numeric_match": True}, NUMERIC,
               numeric_error=abs(round(94 / 5829, 5) - CHANGE_ANS) / CHANGE_ANS),
    RewardCase("invalid JSON (prose)", "The answer is 1.6%.", CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False}, FORMAT),
    RewardCase("truncated JSON", '{"program": "subtract(5829, 57', CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False}, FORMAT),
    RewardCase("JSON without the answer field", json.dumps({"program": CHANGE}), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_json", "format_ok": False}, FORMAT),
    RewardCase("empty output", "", CHANGE, CHANGE_ANS, {"failure_reason": "invalid_json"}, FORMAT),
    RewardCase("unicode prose", "答案是 1.6% 🙂", CHANGE, CHANGE_ANS, {"failure_reason": "invalid_json"}, FORMAT),
    RewardCase("JSON in a code fence", "```json\n" + answer(CHANGE) + "\n```", CHANGE, CHANGE_ANS,
               {"format_ok": True, "exec_match": True}, EXACT),
    RewardCase("unknown op", answer("power(5829, 2)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "format_ok": True, "program_valid": False}, partial(0.0)),
    RewardCase("reference to a later step", answer("divide(#1, 5735), subtract(5829, 5735)"), CHANGE,
               CHANGE_ANS, {"failure_reason": "invalid_program", "program_valid": False}, partial(0.5)),
    RewardCase("division by zero", answer("divide(5829, 0)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "program_valid": False}, partial(0.0)),
    RewardCase("huge exponent does not hang", answer("exp(10, 1000000)"), CHANGE, CHANGE_ANS,
               {"failure_reason": "invalid_program", "program_valid": False}, partial(0.0)),
    RewardCase("table op on a row ($ and commas)", answer("table_sum(revenue, none)", "11564"),
               "table_sum(revenue, none)", 11564.0, {"failure_reason": "correct"}, EXACT),
    RewardCase("table op on a row with a footnote cell '1,000 ( 3 )'", answer("table_average(net income, none)"),
               "table_average(net income, none)", 1100.0, {"exec_match": True}, EXACT),
    RewardCase("table op on a row with a non-number cell", answer("table_max(notes, none)"),
               "table_sum(revenue, none)", 11564.0, {"failure_reason": "invalid_program"}, partial(0.0)),
    RewardCase("table op on a missing row", answer("table_max(profit, none)"), "table_sum(revenue, none)",
               11564.0, {"failure_reason": "invalid_program", "program_valid": False}, partial(0.0)),
    RewardCase("greater, right", answer("greater(5829, 5735)", "yes"), "greater(5829, 5735)", "yes",
               {"failure_reason": "correct"}, EXACT),
    RewardCase("greater, wrong", answer("greater(5735, 5829)", "yes"), "greater(5829, 5735)", "yes",
               {"failure_reason": "wrong_value", "numeric_match": False}, partial(0.0)),
    RewardCase("percent and constants", answer("divide(3.5%, const_100)", "0.035%"), "divide(3.5%, const_100)",
               0.00035, {"exec_match": True}, EXACT),
    # FinQA's script runs unused steps and carries on: "yes" + "yes" is Python's "yesyes", not an error
    RewardCase("an unused step adds two yes/no results", answer("greater(5829, 5735), add(#0, #0), " + CHANGE.replace(
        "#0", "#2")), CHANGE, CHANGE_ANS, {"failure_reason": "correct", "program_match": True}, EXACT),
    # an inf result is valid for FinQA's script (it equals no answer)
    RewardCase("huge number literal", answer("multiply(1e308, 1e308)"), CHANGE, CHANGE_ANS,
               {"program_valid": True, "failure_reason": "wrong_value"}, partial(0.0)),
    # program accuracy compares the result the script holds when a later step fails (exec accuracy does not)
    RewardCase("equivalent program with an unused step that overflows", answer("subtract(5829, 5735), "
               "exp(5829, 5735), subtract(5829, 5735)"), "subtract(5829, 5735)", 94.0,
               {"failure_reason": "invalid_program", "exec_match": False, "program_match": True}, partial(1 / 3)),
]


def run_cases(calculator: RewardCalculator, cases: list[RewardCase] = CASES) -> list[dict]:
    """Each case with what the calculator returned and whether it met every expectation (the total expected
    under the calculator's own weights)."""
    results = []
    for case in cases:
        result = calculator.score(case.completion, case.gold_program, case.exe_ans, case.table).to_dict()
        failed = {}
        for key, expected in case.expectations(calculator.weights).items():
            got = result.get(key)
            same = (abs(got - expected) < 1e-9 if isinstance(expected, float) and isinstance(got, (int, float))
                    else got == expected)
            if not same:
                failed[key] = {"expected": expected, "got": got}
        results.append({"name": case.name, "passed": not failed, "failed": failed, "result": result})
    return results


def case_table(weights: RewardWeights, cases: list[RewardCase] = CASES) -> list[dict]:
    """The cases as 02 records them, each with what it expects under these weights."""
    return [{**asdict(case), "expected": case.expectations(weights)} for case in cases]
