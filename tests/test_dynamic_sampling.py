"""Issue 34: DAPO's dynamic sampling for GRPO and RLOO (algorithm.dynamic_sampling; trl has none): a step never
trains on a group whose completions all got the same reward, and the cap on extra groups holds."""
import json

import numpy as np
import pytest
import torch

from utils import rl_trl
from utils.reward import RewardCalculator
from utils.runs import read_manifest


def test_replace_rows_pads_prompts_left_and_completions_right():
    batch = {"prompt_ids": torch.tensor([[1, 2], [3, 4]]), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
             "completion_ids": torch.tensor([[5], [6]]), "completion_mask": torch.ones(2, 1, dtype=torch.long),
             "advantages": torch.tensor([0.0, 0.0]), "num_items_in_batch": torch.tensor(2)}
    donor = {"prompt_ids": torch.tensor([[7, 8, 9]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
             "completion_ids": torch.tensor([[10, 11]]), "completion_mask": torch.ones(1, 2, dtype=torch.long),
             "advantages": torch.tensor([0.5]), "num_items_in_batch": torch.tensor(2)}
    out = rl_trl.replace_rows(batch, donor, [1], [0], pad_id=0)
    assert out["prompt_ids"].tolist() == [[0, 1, 2], [7, 8, 9]]
    assert out["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out["completion_ids"].tolist() == [[5, 0], [10, 11]]
    assert out["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["advantages"].tolist() == [0.0, 0.5] and batch["advantages"].tolist() == [0.0, 0.0]


class HalfFlatCalculator(RewardCalculator):
    """Half the prompts (gold programs add(...) / greater(...)) score the same whatever is written: all-equal
    groups; the others lose 0.001 per character, so their groups vary (the tiny model never writes JSON)."""

    def score(self, completion, gold_program, exe_ans, table):
        result = super().score(completion, gold_program, exe_ans, table)
        if not gold_program.startswith(("add", "greater")):
            result.total -= 0.001 * len(completion)
        return result


@pytest.mark.parametrize("script, method, cap", [("06_train_grpo.py", "grpo", 3), ("07_train_rloo.py", "rloo", 1)])
def test_no_step_trains_on_an_all_equal_group_and_the_cap_holds(run_stage, monkeypatch, script, method, cap):
    real = rl_trl.make_reward_functions
    monkeypatch.setattr(rl_trl, "make_reward_functions", lambda calculator: real(HalfFlatCalculator(calculator.weights)))
    samplers = []
    real_sampler = rl_trl.DynamicSampler
    monkeypatch.setattr(rl_trl, "DynamicSampler", lambda *a, **k: samplers.append(real_sampler(*a, **k)) or samplers[-1])
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("03_sft_train.py", "--quick_test", "--max_steps", "1", "--skip_validation") == 0
    assert run_stage(script, "--quick_test", "--prompts_per_step", "2", "--set", "algorithm.steps=3",
                     "--set", "algorithm.dynamic_sampling=true",
                     "--set", f"algorithm.dynamic_sampling_max_extra_groups={cap}") == 0

    (sampler,) = samplers
    assert len(sampler.trained) == 3
    for groups in sampler.trained:  # what each step trained on: every group varied, or masked out of the loss
        assert len(groups) == 2 and all(np.ptp(rewards) > 0 or masked for rewards, masked in groups)
    manifest = read_manifest(run_stage.stage_dir(f"0{6 if method == 'grpo' else 7}_{method}"))
    summary = manifest["metrics"]["dynamic_sampling"]
    assert [s["step"] for s in summary["per_step"]] == [1, 2, 3]
    for step in summary["per_step"]:
        assert 2 <= step["groups_drawn"] <= 2 + cap  # the cap holds
        assert step["groups_kept"] + step["groups_masked"] == 2
    assert summary["groups_dropped"] > 0  # the flat prompts were met and replaced or masked
    log = json.loads((run_stage.stage_dir(f"0{6 if method == 'grpo' else 7}_{method}") / "logs" /
                      "training_log.json").read_text())
    steps = [r for r in log if "reward" in r]
    assert [r["dynamic/groups_drawn"] for r in steps] == [s["groups_drawn"] for s in summary["per_step"]]


def test_dynamic_sampling_is_one_process_only(run_stage, monkeypatch, capsys):
    monkeypatch.setattr(rl_trl.processes, "several", lambda: True)
    assert run_stage("06_train_grpo.py", "--quick_test", "--set", "algorithm.dynamic_sampling=true") == 1
    assert "algorithm.dynamic_sampling: runs on one process" in capsys.readouterr().err


@pytest.mark.parametrize("script, setting", [("06_train_grpo.py", "algorithm.scale_rewards=batch"),
                                             ("07_train_rloo.py", "algorithm.normalize_advantages=true")])
def test_dynamic_sampling_refuses_step_wide_scaling(run_stage, capsys, script, setting):
    assert run_stage(script, "--quick_test", "--set", "algorithm.dynamic_sampling=true", "--set", setting) == 1
    err = capsys.readouterr().err
    assert f"error: algorithm.dynamic_sampling with {setting.replace('true', 'True')}" in err and "Traceback" not in err


def test_dynamic_sampling_variants_are_in_the_registry():
    from utils.driver import DriverSettings, parse_methods, plan_and_resolver

    plan, resolver = plan_and_resolver(parse_methods("grpo_dynamic,rloo_dynamic"), DriverSettings(
        "configs/models/smollm2-135m.yaml", "run", 42, True))
    configs = {spec.name: resolver.config(spec)["algorithm"] for spec in plan if spec.name[:2] in ("06", "07")}
    assert {name: config["dynamic_sampling"] for name, config in configs.items()} == \
        {"06_grpo_dynamic": True, "07_rloo_dynamic": True}
