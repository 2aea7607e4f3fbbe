"""The reward calculator: parsing, components, the total rule, weights, and the trl reward functions."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.finqa_program import OPS
from utils.reward import (COMPONENTS, RewardCalculator, RewardWeights, make_reward_functions,
                          make_total_reward_function, parse_completion)

GOLD = "subtract(5829, 5735), divide(#0, 5735)"
EXE_ANS = 0.01639
TABLE = [["", "2019", "2018"], ["revenue", "$ 5,829", "5,735"], ["rate", "35%", "30%"]]
CALC = RewardCalculator()


def answer(program: str, text: str = "1.6%") -> str:
    return json.dumps({"program": program, "answer": text})


def score(completion, gold=GOLD, exe_ans=EXE_ANS, table=TABLE):
    return CALC.score(completion, gold, exe_ans, table)


# ----------------------------------------------------------------------------------------------------------
# parsing

def test_parse_plain_fenced_and_trailing():
    expected = ("subtract(5829, 5735), divide(#0, 5735)", "1.6%")
    for text in [answer(GOLD), f"  {answer(GOLD)}\n", f"```json\n{answer(GOLD)}\n```",
                 f"{answer(GOLD)} so the answer is 1.6%. {{not json", f"Sure! {answer(GOLD)}"]:
        parsed = parse_completion(text)
        assert parsed.ok and (parsed.program, parsed.answer) == expected, text


def test_parse_number_answer():
    assert parse_completion('{"program": "add(1, 2)", "answer": 3}').answer == "3"
    assert parse_completion('{"program": "add(1, 2)", "answer": 3.5}').answer == "3.5"


@pytest.mark.parametrize("text", [
    "", "   ", "no json here", '{"program": "add(1, 2)", "answer": "3"', '{"program": "add(1, 2)"}',
    '{"answer": "3"}', '{"program": 5, "answer": "3"}', '{"program": "add(1, 2)", "answer": null}',
    '{"program": "add(1, 2)", "answer": true}', '{"program": "add(1, 2)", "answer": [3]}', "[1, 2]",
    "{" * 100_000, '{"program": "' + "9" * 100_000, None, 42, b"\xff\xfe{garbage",
])
def test_parse_rejects(text):
    parsed = parse_completion(text)
    assert not parsed.ok and parsed.error


# ----------------------------------------------------------------------------------------------------------
# components and total

def test_correct_program():
    result = score(answer(GOLD))
    assert result.format_ok and result.program_valid and result.exec_match and result.numeric_match
    assert result.program_match and result.partial_program == 1.0
    assert result.failure_reason == "correct" and result.total == 1.0 and result.rewarded == "exact"
    assert result.executed_value == EXE_ANS


def test_equivalent_program_matches():
    result = score(answer("divide(5829, 5735), divide(5735, 5735), subtract(#0, #1)"))
    assert result.exec_match and result.program_match and result.total == 1.0


def test_exec_match_without_program_match():
    # right value from different numbers: execution accuracy yes, program accuracy no
    result = score(answer("divide(94, 5735)"))
    assert result.exec_match and not result.program_match and result.total == 1.0


def test_scale_error():
    result = score(answer("divide(35, const_100)"), gold="divide(35, const_100)", exe_ans=0.35)
    assert result.total == 1.0
    result = score(answer("add(35, 0)", "35%"), gold="divide(35, const_100)", exe_ans=0.35)
    assert result.scale_error and result.failure_reason == "scale_error"
    assert not result.exec_match and not result.numeric_match and result.total != 1.0
    assert result.total == 0.0
    result = score(answer(GOLD + ", multiply(#1, const_100)"))  # 1.639 vs 0.01639
    assert result.scale_error and result.partial_program == pytest.approx(2 / 3)  # 2 gold steps of 3
    assert result.total == pytest.approx(0.2)


def test_numeric_match_within_tolerance():
    result = score(answer("divide(94, 5700)"))  # 0.01649, 0.6% off
    assert result.numeric_match and not result.exec_match and result.total == 0.8
    assert result.rewarded == "numeric" and result.failure_reason == "wrong_value"
    result = score(answer("subtract(1, 1)"), gold="subtract(5, 5)", exe_ans=0.0)
    assert result.exec_match and result.total == 1.0
    result = score(answer("divide(1, 1000)"), gold="subtract(5, 5)", exe_ans=0.0)
    assert not result.numeric_match  # zero target: absolute tolerance 1e-6


def test_wrong_op():
    result = score(answer("add(5829, 5735), divide(#0, 5735)"))
    assert result.program_valid and not result.exec_match and not result.numeric_match
    assert result.failure_reason == "wrong_value"
    assert result.partial_program == 0.5 and result.total == pytest.approx(0.15)
    assert result.rewarded == "partial_program"


def test_partial_program_is_multiset():
    gold = "add(1, 2), add(1, 2), multiply(#0, #1)"
    result = score(answer("add(1, 2), subtract(#0, 1)"), gold=gold, exe_ans=9.0)
    assert result.partial_program == pytest.approx(1 / 3)
    result = score(answer("add(1, 2), add(1, 2), add(#0, #1)"), gold=gold, exe_ans=9.0)
    assert result.partial_program == pytest.approx(2 / 3)


def test_partial_credit_does_not_reward_padding():
    gold = "subtract(5829, 5735), divide(#0, 5735)"
    padded = gold.replace("subtract", "add") + ", add(1, 2), add(3, 4), add(5, 6), add(7, 8)"
    assert score(answer("divide(#0, 5735)"), gold=gold).partial_program == pytest.approx(1 / 2)
    assert score(answer(padded), gold=gold).partial_program == pytest.approx(1 / 6)


def test_invalid_program():
    result = score(answer("subtract(5829, 5735), divide(#0, 0)"))
    assert result.format_ok and not result.program_valid and result.failure_reason == "invalid_program"
    assert "division by zero" in result.error
    assert result.partial_program == 0.5 and result.total == pytest.approx(0.15)
    result = score(answer("foo(1, 2)"))
    assert result.failure_reason == "invalid_program" and result.total == 0.0


@pytest.mark.parametrize("text", ["", "the answer is 1.6%", '{"program": "subtract(5829, 5735)', "{}",
                                  '{"program": "subtract(5829, 5735), divide(#0, 5735)"}'])
def test_format_violation(text):
    result = score(text)
    assert not result.format_ok and result.failure_reason == "invalid_json"
    assert result.total == -0.2 and result.rewarded == "format"


def test_fence_and_trailing_text_score():
    assert score(f"```json\n{answer(GOLD)}\n```").total == 1.0
    assert score(f"{answer(GOLD)}\nExplanation: growth was 1.6%.").total == 1.0


def test_yes_no_answers():
    result = score(answer("greater(5829, 5735)", "yes"), gold="greater(5829, 5735)", exe_ans="yes")
    assert result.exec_match and result.numeric_match and result.program_match and result.total == 1.0
    result = score(answer("greater(5735, 5829)", "no"), gold="greater(5829, 5735)", exe_ans="yes")
    assert not result.exec_match and not result.numeric_match and not result.scale_error
    assert result.failure_reason == "wrong_value"


def test_table_program_and_string_columns():
    result = CALC.score(answer("table_max(revenue, none)"), "table_max(revenue, none)", "5829.0", json.dumps(TABLE))
    assert result.exec_match and result.program_match and result.total == 1.0
    result = CALC.score(answer("greater(2, 1)"), "greater(2, 1)", "yes", "not json")
    assert result.total == 1.0


def test_score_example():
    example = {"target_program": GOLD, "exe_ans": EXE_ANS, "table": TABLE, "id": "x"}
    assert CALC.score_example(answer(GOLD), example).total == 1.0
    with pytest.raises(KeyError):
        CALC.score_example(answer(GOLD), {"target_program": GOLD})


def test_to_dict_is_json():
    data = score(answer(GOLD)).to_dict()
    assert json.loads(json.dumps(data))["total"] == 1.0
    assert set(data) >= {"format_ok", "program_valid", "exec_match", "numeric_match", "program_match",
                         "partial_program", "scale_error", "failure_reason", "executed_value", "total"}


# ----------------------------------------------------------------------------------------------------------
# weights

def test_weights_spec_round_trip(tmp_path):
    import yaml

    weights = RewardWeights(exact=2.0, numeric=0.5, partial_program=0.1, format_violation=-1.0,
                            numeric_tolerance=0.01)
    path = tmp_path / "reward_spec.yaml"
    path.write_text(yaml.safe_dump(weights.to_spec()))
    assert RewardWeights.from_spec(path) == weights
    assert RewardWeights.from_spec(weights.to_spec()) == weights
    assert RewardWeights.from_spec({"weights": {"exact": 1.0}}) == RewardWeights()
    assert weights.bounds() == (-1.0, 2.0)
    assert RewardWeights().bounds() == (-0.2, 1.0)


@pytest.mark.parametrize("spec, bad_key", [
    ({"weights": {"exact_match": 1.0}}, "exact_match"),
    ({"weights": {"exact": "high"}}, "exact"),
    ({"weights": {"numeric": float("nan")}}, "numeric"),
    ({"weights": {"format_violation": True}}, "format_violation"),
    ({"numeric_tolerance": -0.1}, "numeric_tolerance"),
    ({"tolerance": 0.1}, "tolerance"),
    ({"weights": [1, 2]}, "weights"),
])
def test_weights_validation(spec, bad_key):
    with pytest.raises(ValueError, match=bad_key):
        RewardWeights.from_spec(spec)


def test_custom_weights_apply():
    calc = RewardCalculator(RewardWeights(exact=2.0, format_violation=-1.0, partial_program=1.0))
    assert calc.score(answer(GOLD), GOLD, EXE_ANS, TABLE).total == 2.0
    assert calc.score("nope", GOLD, EXE_ANS, TABLE).total == -1.0
    assert calc.score(answer("add(5829, 5735), divide(#0, 5735)"), GOLD, EXE_ANS, TABLE).total == 0.5


# ----------------------------------------------------------------------------------------------------------
# trl reward functions

COMPLETIONS = [answer(GOLD), answer("divide(94, 5700)"), answer("add(5829, 5735), divide(#0, 5735)"),
               "garbage", f"```json\n{answer('greater(2, 1)')}\n```"]


def columns(n):
    golds = [GOLD] * (n - 1) + ["greater(2, 1)"]
    return {"target_program": golds, "exe_ans": [str(EXE_ANS)] * (n - 1) + ["yes"],
            "table": [json.dumps(TABLE)] * (n - 1) + [TABLE]}


def test_component_functions_sum_to_total():
    functions = make_reward_functions(RewardCalculator())
    assert [f.__name__ for f in functions] == [f"reward_{c}" for c in COMPONENTS]
    assert len({f.__name__ for f in functions}) == 4
    kwargs = columns(len(COMPLETIONS))
    parts = [f(prompts=["p"] * len(COMPLETIONS), completions=COMPLETIONS, trainer_state=None, **kwargs)
             for f in functions]
    totals = [sum(values) for values in zip(*parts)]
    expected = [CALC.score(c, g, e, t).total
                for c, g, e, t in zip(COMPLETIONS, kwargs["target_program"], kwargs["exe_ans"], kwargs["table"])]
    assert totals == expected == [1.0, 0.8, pytest.approx(0.15), -0.2, 1.0]
    total_function = make_total_reward_function(CALC)
    assert total_function.__name__ == "reward_total"
    assert total_function(completions=COMPLETIONS, **kwargs) == expected


def test_conversational_completions():
    messages = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    total_function = make_total_reward_function()
    plain = total_function(completions=COMPLETIONS, **columns(len(COMPLETIONS)))
    assert total_function(completions=messages, **columns(len(COMPLETIONS))) == plain
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": answer(GOLD)}]}]]
    assert total_function(completions=parts, target_program=[GOLD], exe_ans=[EXE_ANS], table=[TABLE]) == [1.0]


def test_reward_function_needs_columns():
    with pytest.raises(ValueError, match="target_program"):
        make_total_reward_function()(completions=["x"], exe_ans=["1"], table=[[]])


# ----------------------------------------------------------------------------------------------------------
# properties: never raises, always within bounds

LO, HI = RewardWeights().bounds()


def check(result):
    assert LO <= result.total <= HI
    assert 0.0 <= result.partial_program <= 1.0
    assert result.failure_reason in ("correct", "invalid_json", "invalid_program", "scale_error", "wrong_value")
    assert sum(result.contributions().values()) == result.total
    json.dumps(result.to_dict())


@given(st.text(max_size=400))
@settings(max_examples=200, deadline=None)
def test_score_never_raises_on_text(text):
    check(score(text))


ARGS = st.sampled_from(["5829", "5735", "5,829", "1.6%", "const_100", "const_m1", "0", "-1", "1e308", "nan",
                        "#0", "#1", "#2", "#9", "revenue", "rate", "none", "x", ""])
PROGRAM = st.lists(st.tuples(st.sampled_from(OPS + ("foo",)), ARGS, ARGS), max_size=6).map(
    lambda steps: ", ".join(f"{op}({a}, {b})" for op, a, b in steps))
ANSWER = st.one_of(st.text(max_size=10), st.floats(allow_nan=True), st.integers(), st.none(), st.booleans())


@given(PROGRAM, ANSWER, st.sampled_from(["", "```json\n", "Answer: "]), st.sampled_from(["", "\n```", " trailing {"]),
       st.sampled_from([EXE_ANS, "0.01639", "yes", "no", 0.0, 94.0]))
@settings(max_examples=200, deadline=None)
def test_score_never_raises_on_json(program, answer_value, prefix, suffix, exe_ans):
    completion = prefix + json.dumps({"program": program, "answer": answer_value}) + suffix
    check(CALC.score(completion, GOLD, exe_ans, TABLE))
    check(CALC.score(completion, "table_max(revenue, none), divide(#0, const_100)", exe_ans, TABLE))
