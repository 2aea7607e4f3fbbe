"""Preference pairs (utils/preferences.py, 08_build_prefs.py) and DPO (09_train_dpo.py): the pairing rules on
hand-made scored candidates, preference accuracy by hand and against a plain forward pass, and the stages end to
end on the tiny model (then evaluated by 10_evaluate.py)."""
import json

import pytest
import torch

from conftest import REPO
from utils.config import load_config
from utils.finqa_data import read_jsonl
from utils.preferences import (Candidate, PairingRules, PreferenceError, build_pairs, check_pairs, make_candidate,
                               margin_histogram, pair_logps, pair_prompt, preference_accuracy, sequence_logps,
                               split_heldout)
from utils.runs import read_manifest

DPO_CONFIG = REPO / "configs" / "algorithms" / "dpo.yaml"
MODEL_CONFIG = REPO / "configs" / "models" / "smollm2-135m.yaml"

# reward components as utils.reward.RewardResult.to_dict() gives them, for each kind of candidate
KINDS = {
    "correct": dict(format_ok=True, program_valid=True, exec_match=True, numeric_match=True,
                    failure_reason="correct", total=1.0),
    "numeric": dict(format_ok=True, program_valid=True, exec_match=False, numeric_match=True,
                    failure_reason="wrong_value", total=0.8),
    "wrong": dict(format_ok=True, program_valid=True, exec_match=False, numeric_match=False,
                  failure_reason="wrong_value", total=0.0),
    "invalid_program": dict(format_ok=True, program_valid=False, exec_match=False, numeric_match=False,
                            failure_reason="invalid_program", total=0.0),
    "invalid_json": dict(format_ok=False, program_valid=False, exec_match=False, numeric_match=False,
                         failure_reason="invalid_json", total=-0.2),
}


def score(kind: str, total: float | None = None) -> dict:
    return {**KINDS[kind], **({} if total is None else {"total": total})}


def cands(rules: PairingRules, *specs) -> list[Candidate]:
    """specs: (text, kind) or (text, kind, total)."""
    return [make_candidate(spec[0], score(*spec[1:]), rules, index) for index, spec in enumerate(specs)]


def pairs_of(result) -> list[tuple[str, str]]:
    return [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in result.pairs]


def no_gold():
    raise AssertionError("the gold answer must not be asked for here")


PROMPT = [{"role": "user", "content": "q"}]


# --- pairing rules ----------------------------------------------------------------------------------------

def test_correct_beats_wrong_and_the_pair_is_in_trl_conversational_format():
    rules = PairingRules()
    result = pair_prompt("a", PROMPT, cands(rules, ("W", "wrong"), ("C", "correct")), rules, no_gold)
    assert pairs_of(result) == [("C", "W")] and result.reason is None
    pair = result.pairs[0]
    assert pair["prompt"] == PROMPT
    assert pair["chosen"] == [{"role": "assistant", "content": "C"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "W"}]
    assert (pair["chosen_reward"], pair["rejected_reward"], pair["margin"]) == (1.0, 0.0, 1.0)
    assert (pair["chosen_tier"], pair["rejected_tier"], pair["chosen_source"]) == ("correct", "valid_program",
                                                                                   "candidate")
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 0)


def test_valid_program_beats_invalid_program_only_when_the_reward_agrees():
    rules = PairingRules(min_margin=0.2)
    result = pair_prompt("a", PROMPT, cands(rules, ("bad", "invalid_program", 0.0), ("ok", "wrong", 0.3)), rules)
    assert pairs_of(result) == [("ok", "bad")]
    # a higher tier with a lower reward (partial-program credit) is no preference either way
    result = pair_prompt("a", PROMPT, cands(rules, ("bad", "invalid_program", 0.3), ("ok", "wrong", 0.0)), rules)
    assert result.pairs == [] and result.reason == "no_ordered_pair"


def test_valid_json_beats_invalid_json():
    rules = PairingRules()
    result = pair_prompt("a", PROMPT, cands(rules, ("{x", "invalid_json"), ("{}", "invalid_program")), rules)
    assert pairs_of(result) == [("{}", "{x")] and result.pairs[0]["margin"] == pytest.approx(0.2)


def test_min_margin_is_enforced():
    specs = (("ok", "wrong", 0.15), ("bad", "invalid_program", 0.0))
    rules = PairingRules(min_margin=0.2)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules)
    assert result.pairs == [] and result.reason == "below_min_margin"
    rules = PairingRules(min_margin=0.1)
    assert pairs_of(pair_prompt("a", PROMPT, cands(rules, *specs), rules)) == [("ok", "bad")]
    # 1.0 - 0.8 is 0.19999999999999996 in floats: it still meets a margin of 0.2
    rules = PairingRules(min_margin=0.2)
    assert pairs_of(pair_prompt("a", PROMPT, cands(rules, ("n", "numeric"), ("c", "correct")), rules)) == [("c", "n")]
    with pytest.raises(PreferenceError, match="min_margin must be > 0"):
        PairingRules(min_margin=0.0)


def test_same_tier_pairs_are_off_by_default():
    specs = (("a", "wrong", 0.3), ("b", "wrong", 0.0))
    rules = PairingRules(min_margin=0.2)
    assert pair_prompt("a", PROMPT, cands(rules, *specs), rules).reason == "no_ordered_pair"
    rules = PairingRules(min_margin=0.2, same_tier_pairs=True)
    assert pairs_of(pair_prompt("a", PROMPT, cands(rules, *specs), rules)) == [("a", "b")]


def test_cap_per_prompt_takes_largest_margins_with_new_texts_first():
    specs = (("C", "correct"), ("N", "numeric"), ("W", "wrong"), ("J1", "invalid_json"), ("J2", "invalid_json"))
    rules = PairingRules(max_pairs_per_prompt=0)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold)
    # C>N C>W C>J1 C>J2 N>W N>J1 N>J2 W>J1 W>J2 (N>W has margin 0.8 and different tiers)
    assert len(result.pairs) == result.n_eligible == 9
    rules = PairingRules(max_pairs_per_prompt=2)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold)
    # the largest margin (1.2, C>J1), then the largest with two unused texts (1.0, N>J2) rather than C>J2 (1.2)
    assert pairs_of(result) == [("C", "J1"), ("N", "J2")] and result.n_eligible == 9
    rules = PairingRules(max_pairs_per_prompt=1)
    assert pairs_of(pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold)) == [("C", "J1")]  # best vs worst
    rules = PairingRules(max_pairs_per_prompt=4)
    got = pairs_of(pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold))
    assert got == [("C", "J1"), ("C", "J2"), ("N", "J1"), ("N", "J2")]  # then the rest by rank: C>J2, N>J1


def gold_candidate(rules: PairingRules, kind: str = "correct"):
    return lambda: make_candidate('{"program": "gold"}', score(kind), rules, None, "gold")


def test_no_correct_candidate_without_and_with_the_gold_flag():
    specs = (("W", "wrong"), ("J", "invalid_json"))
    rules = PairingRules(add_gold_when_no_correct=False)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold)
    assert pairs_of(result) == [("W", "J")] and not result.gold_added

    rules = PairingRules(add_gold_when_no_correct=True)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules, gold_candidate(rules))
    assert result.gold_added and result.gold_correct
    assert pairs_of(result) == [('{"program": "gold"}', "J"), ('{"program": "gold"}', "W"), ("W", "J")]
    assert [p["chosen_source"] for p in result.pairs] == ["gold", "gold", "candidate"]
    assert result.pairs[0]["chosen_index"] is None

    # every candidate invalid JSON: nothing to learn without the gold answer, gold pairs with it
    specs = (("x", "invalid_json"), ("y", "invalid_json"))
    rules = PairingRules(add_gold_when_no_correct=False)
    assert pair_prompt("a", PROMPT, cands(rules, *specs), rules).reason == "all_equal_reward"
    rules = PairingRules(add_gold_when_no_correct=True)
    assert len(pair_prompt("a", PROMPT, cands(rules, *specs), rules, gold_candidate(rules)).pairs) == 2

    # a correct candidate: the gold answer is not added even with the flag
    rules = PairingRules(add_gold_when_no_correct=True)
    result = pair_prompt("a", PROMPT, cands(rules, ("C", "correct"), ("J", "invalid_json")), rules, no_gold)
    assert pairs_of(result) == [("C", "J")] and not result.gold_added


def test_all_equal_rewards_give_no_pair_and_the_reason_is_recorded():
    rules = PairingRules(add_gold_when_no_correct=False)
    rows = [{"id": "eq", "prompt": PROMPT, "candidates": ["x", "y", "z"]},
            {"id": "ok", "prompt": PROMPT, "candidates": ["C", "J"]}]
    scores = [{"id": "eq", "index": i, **score("invalid_json")} for i in range(3)] + [
        {"id": "ok", "index": 0, **score("correct")}, {"id": "ok", "index": 1, **score("invalid_json")}]
    pairs, report = build_pairs(rows, scores, rules)
    assert [p["id"] for p in pairs] == ["ok"]
    summary = report.to_dict()
    assert summary["no_pair_reasons"] == {"all_equal_reward": 1}
    assert (summary["n_prompts"], summary["n_prompts_with_pairs"], summary["n_prompts_without_pairs"]) == (2, 1, 1)
    assert summary["pairs_by_tiers"] == {"correct>invalid_json": 1}
    with pytest.raises(PreferenceError, match="no score for candidate 1 of ok"):
        build_pairs(rows, scores[:-1], rules)


def test_identical_texts_are_deduplicated():
    specs = (("A", "correct"), (" A ", "correct"), ("B", "wrong"))
    rules = PairingRules(dedupe=True)
    result = pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold)
    assert pairs_of(result) == [("A", "B")] and result.duplicates_removed == 1
    rules = PairingRules(dedupe=False)
    assert len(pair_prompt("a", PROMPT, cands(rules, *specs), rules, no_gold).pairs) == 2
    rules = PairingRules()
    assert pair_prompt("a", PROMPT, cands(rules, ("A", "correct"), ("A", "correct")), rules,
                       no_gold).reason == "single_unique_text"
    assert pair_prompt("a", PROMPT, [], rules).reason == "no_candidates"


def test_check_pairs_rejects_a_pair_below_the_margin():
    rules = PairingRules()
    good = pair_prompt("a", PROMPT, cands(rules, ("C", "correct"), ("J", "invalid_json")), rules, no_gold).pairs
    assert check_pairs(good, 0.2) == 1
    bad = dict(good[0], rejected_reward=0.9, margin=0.1)
    with pytest.raises(PreferenceError, match=r"pair 1 \(id a\) breaks the margin rule"):
        check_pairs([bad], 0.2)
    with pytest.raises(PreferenceError, match="same text"):
        check_pairs([dict(good[0], rejected=good[0]["chosen"])], 0.2)


def test_heldout_split_is_by_prompt_and_seeded():
    pairs = [{"id": f"p{i}", "n": k} for i in range(10) for k in range(3)]
    train, heldout = split_heldout(pairs, 0.2, seed=1)
    assert len({p["id"] for p in heldout}) == 2 and len(heldout) == 6 and len(train) == 24
    assert not {p["id"] for p in train} & {p["id"] for p in heldout}
    assert split_heldout(pairs, 0.2, seed=1) == (train, heldout)
    assert split_heldout(pairs, 0.0, seed=1) == (pairs, [])
    assert len({p["id"] for p in split_heldout(pairs[:6], 0.2, seed=1)[1]}) == 1  # 2 prompts: at least one out
    assert split_heldout(pairs[:3], 0.5, seed=1) == (pairs[:3], [])               # 1 prompt: never all


def test_margin_histogram_bins():
    assert margin_histogram([0.19999999999999996, 0.2, 1.2, 0.05], 0.1) == {
        "[0.0, 0.1)": 1, "[0.1, 0.2)": 0, "[0.2, 0.3)": 2, "[0.3, 0.4)": 0, "[0.4, 0.5)": 0, "[0.5, 0.6)": 0,
        "[0.6, 0.7)": 0, "[0.7, 0.8)": 0, "[0.8, 0.9)": 0, "[0.9, 1.0)": 0, "[1.0, 1.1)": 0, "[1.1, 1.2)": 0,
        "[1.2, 1.3)": 1}
    assert margin_histogram([0.25, 1.0, 0.19999999999999996], 0.2, start=0.2) == {
        "[0.2, 0.4)": 2, "[0.4, 0.6)": 0, "[0.6, 0.8)": 0, "[0.8, 1.0)": 0, "[1.0, 1.2)": 1}
    assert margin_histogram([], 0.1) == {}


def test_rules_from_the_config_file():
    config = load_config(MODEL_CONFIG, DPO_CONFIG, overrides=["algorithm.preferences.min_margin=0.5"])
    rules = PairingRules.from_config(config["algorithm"]["preferences"])
    assert rules.min_margin == 0.5 and rules.tiers == ("exec_match", "numeric_match", "program_valid", "format_ok")
    with pytest.raises(PreferenceError, match="unknown key"):
        PairingRules.from_config({"min_margn": 0.1})
    with pytest.raises(PreferenceError, match="tiers"):
        PairingRules(tiers=("exec_match", "vibes"))
    quick = load_config(MODEL_CONFIG, DPO_CONFIG, quick_test=True)["algorithm"]
    assert quick["max_steps"] > 0 and quick["n_val_examples"] <= 8


# --- preference accuracy ----------------------------------------------------------------------------------

def test_preference_accuracy_by_hand():
    pairs = [{"chosen_source": "gold"}, {"chosen_source": "candidate"}, {"chosen_source": "candidate"}]
    reference = [{"chosen_logp": -10.0, "rejected_logp": -5.0, "chosen_tokens": 10, "rejected_tokens": 2},
                 {"chosen_logp": -3.0, "rejected_logp": -4.0, "chosen_tokens": 1, "rejected_tokens": 1},
                 {"chosen_logp": -2.0, "rejected_logp": -6.0, "chosen_tokens": 1, "rejected_tokens": 1}]
    before = preference_accuracy(pairs, reference, reference, beta=0.1)
    # sums: -10 < -5 (no), -3 > -4, -2 > -6; per token: -1.0 > -2.5 (yes), yes, yes; margins all 0
    assert before["logp_accuracy"] == pytest.approx(2 / 3, abs=1e-5) and before["logp_accuracy_per_token"] == 1.0
    assert before["implicit_reward_accuracy"] == 0.0 and before["mean_implicit_margin"] == 0.0
    policy = [{"chosen_logp": -8.0, "rejected_logp": -7.0, "chosen_tokens": 10, "rejected_tokens": 2},
              {"chosen_logp": -3.5, "rejected_logp": -4.0, "chosen_tokens": 1, "rejected_tokens": 1},
              {"chosen_logp": -2.0, "rejected_logp": -5.0, "chosen_tokens": 1, "rejected_tokens": 1}]
    after = preference_accuracy(pairs, policy, reference, beta=0.1)
    # margins: 0.1 * ((-8 + 10) - (-7 + 5)) = 0.4; 0.1 * (-0.5 - 0) = -0.05; 0.1 * (0 - 1) = -0.1
    assert after["implicit_reward_accuracy"] == pytest.approx(1 / 3, abs=1e-5)
    assert after["mean_implicit_margin"] == pytest.approx((0.4 - 0.05 - 0.1) / 3, abs=1e-6)
    assert after["logp_accuracy"] == pytest.approx(2 / 3, abs=1e-5)
    assert after["by_source"] == {"candidate": {"n_pairs": 2, "logp_accuracy": 1.0},
                                  "gold": {"n_pairs": 1, "logp_accuracy": 0.0}}
    assert preference_accuracy(pairs, [None] * 3, reference, 0.1)["logp_accuracy"] is None


def test_sequence_logps_match_an_unpadded_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[{"role": "user", "content": "what was the change in revenue 3?"}],
               [{"role": "user", "content": "q"}]]
    pairs = [{"prompt": p, "chosen": [{"role": "assistant", "content": '{"program": "add(1, 2)", "answer": "3"}'}],
              "rejected": [{"role": "assistant", "content": "nope"}]} for p in prompts]
    scored = pair_logps(model, tokenizer, pairs, max_length=None, batch_size=4)
    for pair, got in zip(pairs, scored):
        for side in ("chosen", "rejected"):
            prompt_ids = tokenizer.apply_chat_template(pair["prompt"], tokenize=True, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True,
                                                 return_dict=True)["input_ids"]
            assert full[:len(prompt_ids)] == prompt_ids
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0]
            logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full[1:]).unsqueeze(-1)).squeeze(-1)
            expected = logps[len(prompt_ids) - 1:].sum().item()
            assert got[f"{side}_logp"] == pytest.approx(expected, abs=1e-4)
            assert got[f"{side}_tokens"] == len(full) - len(prompt_ids)
    # a prompt that fills max_length is dropped, as trl drops it
    assert pair_logps(model, tokenizer, pairs[:1], max_length=5)[0] is None
    assert sequence_logps(model, [], pad_id=0) == []


# --- stages -----------------------------------------------------------------------------------------------

def test_prefs_and_dpo_stages_then_evaluate(run_stage, capsys):
    from safetensors.torch import load_file

    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("02_build_rewards.py") == 0
    assert run_stage("03_sft_train.py", "--quick_test", "--skip_validation", "--max_steps", "1") == 0
    assert run_stage("08_build_prefs.py") == 1  # no candidates yet: one line, non-zero exit
    assert "04_candidates is not a completed stage" in capsys.readouterr().err
    assert run_stage("04_generate_candidates.py", "--quick_test") == 0

    assert run_stage("08_build_prefs.py", "--quick_test") == 0
    prefs = run_stage.stage_dir("08_preferences")
    manifest = read_manifest(prefs)
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    train, heldout = read_jsonl(prefs / "pairs.jsonl"), read_jsonl(prefs / "heldout_pairs.jsonl")
    assert train and heldout and len(train) + len(heldout) == metrics["n_pairs"]
    assert (metrics["n_train_pairs"], metrics["n_heldout_pairs"]) == (len(train), len(heldout))
    assert not {p["id"] for p in train} & {p["id"] for p in heldout}
    min_margin = manifest["config"]["algorithm"]["preferences"]["min_margin"]
    for pair in train + heldout:
        assert pair["chosen_reward"] >= pair["rejected_reward"] + min_margin - 1e-9
        assert pair["chosen"][0]["role"] == "assistant" and pair["prompt"][-1]["role"] == "user"
    assert metrics["n_prompts"] == 4 and metrics["add_gold_when_no_correct"] is True
    assert metrics["n_prompts_with_pairs"] + sum(metrics["no_pair_reasons"].values()) == metrics["n_prompts"]
    assert sum(metrics["margin_histogram"].values()) == metrics["n_pairs"]
    assert (prefs / "plots" / "margin_histogram.png").stat().st_size > 0
    stats = (prefs / "stats.txt").read_text()
    assert "margin histogram" in stats and f"pairs: {metrics['n_pairs']}" in stats

    assert run_stage("09_train_dpo.py", "--quick_test", "--max_steps", "2", "--learning_rate", "1e-3",
                     "--set", "algorithm.eval_every_steps=1", "--set", "algorithm.eval_pairs_every_steps=2") == 0
    out = run_stage.stage_dir("09_dpo")
    manifest = read_manifest(out)
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    assert metrics["steps"] == 2 and metrics["n_heldout_pairs"] == len(heldout)
    for key in ("preference_accuracy_before", "preference_accuracy_after", "implicit_reward_accuracy_after",
                "initial_val_parse_rate", "final_val_parse_rate", "wall_time_s", "n_train_pairs"):
        assert metrics[key] is not None, key
    before, after = metrics["preference_accuracy"]["before"], metrics["preference_accuracy"]["after"]
    assert before["n_pairs"] == after["n_pairs"] == len(heldout)
    assert before["implicit_reward_accuracy"] == 0.0 and before["mean_implicit_margin"] == 0.0
    assert after["mean_implicit_margin"] != 0.0  # the policy moved away from the reference

    for name in ("final", "best"):
        ckpt = out / "ckpt_dpo" / name
        assert (ckpt / "adapter_config.json").is_file()
        adapters = json.loads((ckpt / "base_adapters.json").read_text())["adapters"]
        assert adapters == [str(run_stage.stage_dir("03_sft") / "ckpt_sft" / "best")]
    weights = load_file(out / "ckpt_dpo" / "final" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # LoRA B starts at zero: it trained

    log = json.loads((out / "logs" / "training_log.json").read_text())
    train_records = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert key in train_records[0], key
    assert any("eval_rewards/margins" in r for r in log)  # held-out pairs evaluated by the trainer
    for step in (0, 1, 2):
        record = json.loads((out / "val_generations" / f"step_{step}.json").read_text())
        assert record["summary"]["n_examples"] == 4 and record["summary"]["step"] == step
    assert (out / "preference_eval.json").is_file()

    assert run_stage("10_evaluate.py", "--label", "dpo", "--quick_test") == 0
    evaluation = read_manifest(run_stage.stage_dir("10_evaluation") / "dpo")
    assert evaluation["status"] == "completed"
    assert evaluation["checkpoint"].endswith("09_dpo/ckpt_dpo/final")
