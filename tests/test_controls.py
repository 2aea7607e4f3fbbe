"""Issue 34: control runs, each RL method at its own budget on a reward that carries no information about the
answer: `<method>_random` (each step's rewards randomly permuted over its completions) and `<method>_format` (the
format term alone), declared as variants the driver plans like any other."""
import pytest

from utils.driver import DriverSettings, parse_methods, plan_and_resolver, preset_overrides
from utils.reward import COMPONENTS, RewardCalculator, make_reward_functions
from utils.runs import read_manifest
from utils.stages import STAGES, VARIANTS

GOLD = "subtract(1200, 1000), divide(#0, 1000)"  # 0.2
COMPLETIONS = ['{"program": "subtract(1200, 1000), divide(#0, 1000)", "answer": "20%"}',  # exact
               '{"program": "subtract(1200, 1000)", "answer": "200"}',                     # partial
               'not json at all',                                                          # format violation
               '{"program": "add(1, 2)", "answer": "3"}',                                  # wrong
               '{"program": "subtract(1201, 1000), divide(#0, 1000)", "answer": "20%"}']   # numeric


def scored(calculator):
    return [calculator.score(text, GOLD, 0.2, []) for text in COMPLETIONS]


def test_shuffled_rewards_keep_the_values_and_lose_the_link():
    real = [r.total for r in scored(RewardCalculator())]
    assert len(set(real)) >= 4
    control = RewardCalculator(shuffle_seed=3)
    batches = [[r.total for r in control.for_training(scored(control))] for _ in range(20)]
    assert all(sorted(batch) == sorted(real) for batch in batches)  # each step: the same values
    assert sum(batch != real for batch in batches) >= 18             # almost never in their order
    again = RewardCalculator(shuffle_seed=3)
    assert [[r.total for r in again.for_training(scored(again))] for _ in range(20)] == batches  # seeded
    assert RewardCalculator().for_training(scored(RewardCalculator())) == scored(RewardCalculator())
    # seeded by step: a resumed run redoing step 7 permutes as the interrupted one did
    first, redone = RewardCalculator(shuffle_seed=3), RewardCalculator(shuffle_seed=3)
    assert [r.total for r in first.for_training(scored(first), 7)] == \
        [r.total for r in redone.for_training(scored(redone), 7)]
    # one item at a time (validation, evaluation) is never shuffled
    assert [r.total for r in scored(control)] == real


def test_trl_reward_functions_share_one_permutation_per_batch():
    control = RewardCalculator(shuffle_seed=5)
    functions = make_reward_functions(control)
    columns = {"target_program": [GOLD] * 5, "exe_ans": ["0.2"] * 5, "table": [[]] * 5}
    parts = [function(COMPLETIONS, **columns) for function in functions]
    totals = [sum(values) for values in zip(*parts)]  # trl adds the components (reward_weights 1.0)
    real = [r.total for r in scored(RewardCalculator())]
    assert sorted(totals) == pytest.approx(sorted(real)) and totals != pytest.approx(real)
    assert len(parts) == len(COMPONENTS)


def test_controls_are_variants_the_driver_plans_with_their_methods_budget():
    for method in ("ppo", "grpo", "rloo"):
        assert {f"{method}_random", f"{method}_format"} <= set(VARIANTS)
        assert STAGES[f"{method}_random"].variant_of == method
    _, preset = preset_overrides("cpu")
    plan, resolver = plan_and_resolver(parse_methods("grpo,grpo_random,grpo_format"), DriverSettings(
        "configs/models/smollm2-135m.yaml", "study", 42, False, preset=preset))
    configs = {spec.name: resolver.config(spec)["algorithm"] for spec in plan if spec.name.startswith("06_")}
    assert set(configs) == {"06_grpo", "06_grpo_random", "06_grpo_format"}
    assert [configs[name]["reward_control"] for name in sorted(configs)] == ["none", "none", "shuffled"]
    assert configs["06_grpo_format"]["reward_weights"] == {"exact": 0.0, "numeric": 0.0, "partial_program": 0.0}
    budget = ("steps", "prompts_per_step", "num_generations", "max_completion_length", "learning_rate")
    assert len({tuple(config[key] for key in budget) for config in configs.values()}) == 1  # the same budget
    labels = [spec.label for spec in plan if spec.label]
    assert {"grpo", "grpo_random", "grpo_format"} <= set(labels)  # 10 evaluates each, 11 compares them


def test_the_budget_curve_is_planned_at_equal_budgets_per_step():
    _, preset = preset_overrides("cpu")
    names = "grpo,grpo_c512,grpo_dynamic_c512,grpo_c2048,grpo_random_c2048"
    plan, resolver = plan_and_resolver(parse_methods(names), DriverSettings(
        "configs/models/smollm2-135m.yaml", "curve", 42, False, preset=preset))
    configs = {spec.stage.key: resolver.config(spec)["algorithm"] for spec in plan if spec.name.startswith("06_")}
    assert set(configs) == set(names.split(","))
    per_step = {key: config["prompts_per_step"] * config["num_generations"] for key, config in configs.items()}
    assert set(per_step.values()) == {16}
    completions = {key: config["steps"] * per_step[key] for key, config in configs.items()}
    assert completions == {"grpo": 128, "grpo_c512": 512, "grpo_dynamic_c512": 512, "grpo_c2048": 2048,
                           "grpo_random_c2048": 2048}
    assert {key: config["eval_every_steps"] for key, config in configs.items()} == {
        "grpo": 8, "grpo_c512": 8, "grpo_dynamic_c512": 8, "grpo_c2048": 32, "grpo_random_c2048": 32}
    assert configs["grpo_random_c2048"]["reward_control"] == "shuffled" and configs["grpo_dynamic_c512"][
        "dynamic_sampling"] and not configs["grpo_c2048"]["dynamic_sampling"]
    same = ("max_completion_length", "learning_rate", "temperature", "beta")
    assert len({tuple(config[key] for key in same) for config in configs.values()}) == 1
    assert sum(spec.stage.key == "sft" for spec in plan) == 1  # one SFT for every point


def test_ppo_stage_trains_on_shuffled_rewards(run_stage, monkeypatch):
    seen = []
    real = RewardCalculator.for_training

    def spying(self, results, step=None):
        seen.append((self.shuffled, len(results), step))
        return real(self, results, step)
    monkeypatch.setattr(RewardCalculator, "for_training", spying)
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("03_sft_train.py", "--quick_test", "--max_steps", "1", "--skip_validation") == 0
    assert run_stage("05_train_ppo.py", "--quick_test", "--set", "algorithm.reward_control=shuffled",
                     "--set", "algorithm.eval_every_steps=100") == 0
    assert seen == [(True, 4, 0), (True, 4, 1)]  # each step's rollout batch (quick: 2 steps of 4), the control on
    manifest = read_manifest(run_stage.stage_dir("05_ppo"))
    assert manifest["reward_control"] == "shuffled" and manifest["config"]["algorithm"]["reward_control"] == "shuffled"
