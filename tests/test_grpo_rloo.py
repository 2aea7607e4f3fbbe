"""Stages 06 (GRPO) and 07 (RLOO) on the tiny model, the advantage estimators, and a toy task both methods learn."""
import utils  # noqa: F401  (first: sets the threading environment before torch loads)

import contextlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, load_stage, one_error
from safetensors.torch import load_file

import utils.rl_trl as rl_trl
from utils.config import ConfigError, load_config
from utils.finqa_data import load_processed
from utils.generation import stop_token_ids
from utils.models import MergedCopy, load_model, load_tokenizer, lora_config
from utils.ppo import pad_batch
from utils.reward import COMPONENTS, RewardCalculator
from utils.rl_trl import RewardRecorder, advantage_variance, leave_one_out_advantages, reinforce_advantages, \
    summarize_advantage_variance
from utils.runs import StageError, read_manifest
from utils.stage_inputs import rl_train_rows

BUDGET_KEYS = ("steps", "prompts_per_step", "num_generations", "completions_per_step", "total_completions",
               "max_completion_length", "temperature", "top_p")


# ----------------------------------------------------------------------------------------------------------
# estimators

def test_leave_one_out_advantage_sign_and_sum():
    rewards = [1.0, 0.0, 0.0, 0.5, -0.2, -0.2, -0.2, -0.2, 0.8, 1.0, -0.2, 0.3]
    advantages = leave_one_out_advantages(rewards, 4).reshape(-1, 4)
    grouped = np.asarray(rewards).reshape(-1, 4)
    np.testing.assert_allclose(advantages.sum(axis=1), 0.0, atol=1e-12)  # sums to zero per group
    above = grouped > grouped.mean(axis=1, keepdims=True)
    below = grouped < grouped.mean(axis=1, keepdims=True)
    assert (advantages[above] > 0).all() and (advantages[below] < 0).all()
    np.testing.assert_allclose(advantages[1], 0.0, atol=1e-12)  # a group that all scored alike teaches nothing
    # A_i = r_i - mean of the others = K/(K-1) (r_i - group mean)
    np.testing.assert_allclose(advantages[0, 0], 1.0 - (0.0 + 0.0 + 0.5) / 3)
    np.testing.assert_allclose(advantages, 4 / 3 * (grouped - grouped.mean(axis=1, keepdims=True)), atol=1e-12)
    with pytest.raises(ValueError):
        leave_one_out_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError):
        leave_one_out_advantages([1.0, 2.0], 1)


def test_reinforce_and_variance_comparison():
    rewards = [0.8, 1.0, 0.8, 1.0, 0.9, 0.7, 0.9, 0.7]  # a common offset: a baseline removes it
    np.testing.assert_array_equal(reinforce_advantages(rewards), rewards)
    stats = advantage_variance(rewards, 4)
    assert stats["loo"]["mean"] == pytest.approx(0.0)
    assert stats["reinforce"]["mean_square"] == pytest.approx(np.mean(np.square(rewards)))
    assert stats["loo"]["mean_square"] < stats["reinforce"]["mean_square"]
    summary = summarize_advantage_variance([stats, advantage_variance([-0.2] * 8, 4)])
    assert summary["n_steps"] == 2 and summary["steps_loo_lower_mean_square"] == 2
    assert summary["mean_square_ratio_loo_over_reinforce"] < 1


def test_recorder_sums_components_per_group():
    def part(index):
        def reward(completions, **kwargs):
            return [float(index + i) for i in range(len(completions))]
        reward.__name__ = f"reward_part{index}"
        return reward

    recorder = RewardRecorder([part(0), part(1)], group_size=2)
    assert [f.__name__ for f in recorder.functions] == ["reward_part0", "reward_part1"]
    kwargs = {"id": ["a", "a", "b", "b"], "completion_ids": [[1, 2], [3], [4, 5, 6], []]}
    for function in recorder.functions:
        function(["x"] * 4, **kwargs)
    (batch,) = recorder.batches
    assert batch["rewards"] == [[1.0, 3.0], [5.0, 7.0]] and batch["ids"] == ["a", "b"]
    assert batch["grouped_by_prompt"] and recorder.total_generated_tokens == 6 and recorder.total_completions == 4
    assert recorder.zero_variance_groups() == {"fraction": 0.0, "steps_with_no_varied_group": 0, "per_step": [0.0]}
    recorder.batches += [{"rewards": [[0.0, 0.0], [1.0, 0.3]]}, {"rewards": [[0.0, 0.0], [-0.2, -0.2]]}]
    assert recorder.zero_variance_groups() == {"fraction": 0.5, "steps_with_no_varied_group": 1,
                                               "per_step": [0.0, 0.5, 1.0]}


# ----------------------------------------------------------------------------------------------------------
# the stages

class ShapedCalculator(RewardCalculator):
    """The real calculator minus 0.001 per character. The tiny model never writes JSON, so every completion would
    get the same format penalty, every group's advantages would be zero and nothing would train."""

    def score(self, completion, gold_program, exe_ans, table):
        result = super().score(completion, gold_program, exe_ans, table)
        result.total -= 0.001 * len(completion)  # contributions() gives it to the rewarded component
        return result


@pytest.fixture
def reward_calls(monkeypatch):
    """Shape the stages' reward (see ShapedCalculator) and record what trl passes to the reward functions."""
    calls = []
    real = rl_trl.make_reward_functions

    def spying(calculator):
        functions = real(ShapedCalculator(calculator.weights))

        def wrap(function):
            def reward(completions, **kwargs):
                values = function(completions, **kwargs)
                calls.append({"name": function.__name__, "n": len(completions), "values": values,
                              "weights": calculator.weights, **{
                    key: kwargs.get(key) for key in ("id", "target_program", "exe_ans", "table")}})
                return values
            reward.__name__ = function.__name__
            return reward

        return [wrap(function) for function in functions]

    monkeypatch.setattr(rl_trl, "make_reward_functions", spying)
    return calls


def lora_b_norm(adapter_dir) -> float:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    norms = [tensor.abs().sum().item() for name, tensor in weights.items() if "lora_B" in name]
    assert norms
    return sum(norms)


def test_grpo_and_rloo_stages(run_stage, reward_calls):
    run = run_stage
    assert run("01_prepare_dataset.py") == 0
    assert run("02_build_rewards.py") == 0
    assert run("03_sft_train.py", "--quick_test", "--max_steps", "1", "--skip_validation") == 0
    budget = ("--prompts_per_step", "2", "--set", "algorithm.eval_every_steps=1")  # not the quick defaults
    assert run("06_train_grpo.py", "--quick_test", "--beta", "0.1", *budget) == 0
    grpo_calls = len(reward_calls)
    assert run("07_train_rloo.py", "--quick_test", "--set", "algorithm.micro_batch_size=4", *budget) == 0
    train = {row["id"]: row for row in load_processed(run.root / "processed" / "train.jsonl")}

    manifests = {}
    for method, folder in (("grpo", "06_grpo"), ("rloo", "07_rloo")):
        out = run.stage_dir(folder)
        manifest = manifests[method] = read_manifest(out)
        assert manifest["status"] == "completed"
        metrics = manifest["metrics"]
        ckpt = out / f"ckpt_{method}"
        for name in ("best", "final"):
            assert (ckpt / name / "adapter_config.json").is_file()
            sft = json.loads((ckpt / name / "base_adapters.json").read_text())["adapters"]
            assert sft == [str(run.stage_dir("03_sft") / "ckpt_sft" / "best")]
        assert lora_b_norm(ckpt / "final") > 0  # the new adapter trained (it starts at B = 0)

        log = json.loads((out / "logs" / "training_log.json").read_text())
        steps = [record for record in log if "reward" in record]
        assert [record["step"] for record in steps] == [1, 2]
        for key in (*rl_trl.LOG_KEYS, "kl", "clip_ratio/region_mean"):
            assert all(key in record for record in steps), key
        assert metrics["missing_log_keys"] == []
        for record in steps:  # the components add up to the logged total
            total = sum(record[f"rewards/reward_{name}/mean"] for name in COMPONENTS)
            assert total == pytest.approx(record["reward"], abs=1e-5)
        for record in steps:  # the step's time split, as PPO logs it
            parts = [record[f"time_{part}_s"] for part in ("generation", "reward", "training")]
            assert all(part > 0 for part in parts) and sum(parts) == pytest.approx(record["time_step_s"])
            assert 0 < record["time_scoring_s"] < record["time_training_s"]  # the reference pass, part of training
        assert metrics["seconds"]["step"] == pytest.approx(sum(r["time_step_s"] for r in steps), abs=0.2)

        val = sorted((out / "val_generations").glob("step_*.json"))
        assert [p.name for p in val] == ["step_0.json", "step_1.json", "step_2.json"]
        assert json.loads(val[0].read_text())["summary"]["step"] == 0
        assert [s["step"] for s in metrics["validation"]] == [0, 1, 2]
        for key in ("initial_val_reward", "final_val_reward", "initial_val_parse_rate", "final_val_parse_rate",
                    "final_kl", "wall_time_s", "total_generated_tokens"):
            assert metrics[key] is not None, key
        assert metrics["total_completions"] == metrics["budget"]["total_completions"] == 2 * 2 * 4
        assert metrics["total_generated_tokens"] > 0
        zero = metrics["groups_with_zero_reward_variance"]
        assert len(zero["per_step"]) == 2 and zero["fraction"] == pytest.approx(np.mean(zero["per_step"]))
    assert manifests["grpo"]["config"]["algorithm"]["beta"] == 0.1
    assert manifests["rloo"]["config"]["algorithm"]["micro_batch_size"] == 4
    # same default budget for both methods
    assert {k: manifests["grpo"]["metrics"]["budget"][k] for k in BUDGET_KEYS} == \
           {k: manifests["rloo"]["metrics"]["budget"][k] for k in BUDGET_KEYS}

    # the reward functions got the gold fields of the prompts they scored, each prompt's completions together
    assert {call["name"] for call in reward_calls} == {f"reward_{name}" for name in COMPONENTS}
    assert len(reward_calls) == 2 * 2 * len(COMPONENTS) and grpo_calls == 2 * len(COMPONENTS)
    for call in reward_calls:
        assert call["n"] == 8 and len(set(call["id"][:4])) == 1 and len(set(call["id"][4:])) == 1
        for example_id, program, exe_ans, table in zip(call["id"], call["target_program"], call["exe_ans"],
                                                       call["table"]):
            row = train[example_id]
            assert program == row["target_program"] and exe_ans == str(row["exe_ans"]) and table == row["table"]

    variance = json.loads((run.stage_dir("07_rloo") / "logs" / "advantage_variance.json").read_text())
    assert [s["step"] for s in variance["steps"]] == [1, 2]
    assert all(s["grouped_by_prompt"] and s["n_groups"] == 2 for s in variance["steps"])
    assert manifests["rloo"]["metrics"]["advantage_variance"]["n_steps"] == 2
    for step in variance["steps"]:
        np.testing.assert_allclose(leave_one_out_advantages(step["rewards"], 4).reshape(2, 4).sum(1), 0, atol=1e-9)

    for label in ("grpo", "rloo"):
        assert run("10_evaluate.py", "--label", label, "--quick_test") == 0
        evaluation = read_manifest(run.stage_dir("10_evaluation") / label)
        assert evaluation["checkpoint"].endswith(f"ckpt_{label}/final")


def test_stage_rejects_bad_input(run_stage, tmp_path, capsys, monkeypatch):
    assert run_stage("06_train_grpo.py", "--quick_test", "--num_generations", "1") == 1
    assert "'algorithm.num_generations' must be an integer >= 2" in capsys.readouterr().err
    not_adapter = tmp_path / "merged"  # a model folder: config.json and weights, no adapter_config.json
    not_adapter.mkdir()
    (not_adapter / "config.json").write_text("{}")
    (not_adapter / "model.safetensors").write_bytes(b"")
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("07_train_rloo.py", "--quick_test", "--policy_ckpt", str(not_adapter)) == 1
    assert f"error: --policy_ckpt {not_adapter}: expected a LoRA adapter folder" in capsys.readouterr().err
    # vLLM rollouts where vLLM is not installed: an error before anything is written, never a fall-back
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    for script in ("06_train_grpo.py", "07_train_rloo.py"):
        out = tmp_path / f"vllm_{script}"
        assert run_stage(script, "--quick_test", "--set", "algorithm.use_vllm=true", "--output_dir", str(out)) == 1
        assert one_error(capsys, "algorithm.use_vllm: vLLM is not installed; install it with bash setup.sh --vllm")
        assert not out.exists()
        # server mode: refused (nothing starts `trl vllm-serve`)
        assert run_stage(script, "--quick_test", "--set", "algorithm.use_vllm=true", "--set",
                         "algorithm.vllm_mode=server", "--output_dir", str(out)) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: algorithm.vllm_mode: server needs a `trl vllm-serve` process")
        assert "use algorithm.vllm_mode=colocate" in err and err.count("\n") == 1 and not out.exists()
    assert run_stage("06_train_grpo.py", "--quick_test", "--set", "algorithm.vllm_mode=remote") == 1
    assert "'algorithm.vllm_mode' must be one of colocate, server" in capsys.readouterr().err
    # a trl whose private method (replaced by utils.rl_trl) takes other parameters: one error line, nothing written
    import trl

    monkeypatch.setattr(trl.RLOOTrainer, "_get_per_token_logps_and_entropies", lambda self, model, batch: None)
    out = tmp_path / "changed_trl"
    assert run_stage("07_train_rloo.py", "--quick_test", "--output_dir", str(out)) == 1
    assert one_error(capsys, f"trl {trl.__version__}: RLOOTrainer._get_per_token_logps_and_entropies takes (self, "
                             f"model, batch, ...); this stage replaces it")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# train prompts: all, or those whose SFT candidates got different rewards

def write_scores(path, rewards_by_id: dict) -> Path:
    lines = [{"id": example_id, "index": index, "total": total}
             for example_id, totals in rewards_by_id.items() for index, total in enumerate(totals)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rl_train_rows_keeps_prompts_with_mixed_rewards(run_stage, tmp_path):
    assert run_stage("01_prepare_dataset.py") == 0
    ids = [row["id"] for row in load_processed(run_stage.root / "processed" / "train.jsonl")]
    scores = write_scores(tmp_path / "scores.jsonl", {ids[0]: [-0.2, -0.2, -0.2], ids[1]: [0.0, 1.0],
                                                      ids[2]: [0.3], ids[3]: [0.8, 0.8, -0.2]})
    args = SimpleNamespace(run_id="run_001")

    def rows(*overrides):
        config = load_config(REPO / "configs/models/smollm2-135m.yaml", REPO / "configs/algorithms/grpo.yaml",
                             overrides=[f"data.processed_dir={run_stage.root / 'processed'}",
                                        f"paths.outputs_dir={run_stage.root / 'outputs'}", *overrides])
        return [row["id"] for row in rl_train_rows(args, config)]

    assert rows() == ids
    mixed = ("algorithm.train_prompts=mixed", f"algorithm.candidate_scores={scores}")
    assert rows(*mixed) == [ids[1], ids[3]]  # in train.jsonl's order
    assert rows(*mixed, "algorithm.max_train_examples=1") == [ids[1]]
    with pytest.raises(ConfigError, match="'algorithm.train_prompts' must be one of all, mixed"):
        rows("algorithm.train_prompts=hard")
    with pytest.raises(StageError, match="04_candidates is not a completed stage"):
        rows("algorithm.train_prompts=mixed")
    with pytest.raises(StageError, match="algorithm.candidate_scores: file not found"):
        rows("algorithm.train_prompts=mixed", f"algorithm.candidate_scores={tmp_path / 'none.jsonl'}")
    alike = write_scores(tmp_path / "alike.jsonl", {ids[0]: [0.0, 0.0], "not-in-train": [0.0, 1.0]})
    with pytest.raises(StageError, match="alike.jsonl: no train prompt"):
        rows("algorithm.train_prompts=mixed", f"algorithm.candidate_scores={alike}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": ids[0], "total": 1.0}) + "\n" + json.dumps({"id": ids[0]}) + "\n")
    with pytest.raises(StageError, match="broken.jsonl: candidate 2 lacks"):
        rows("algorithm.train_prompts=mixed", f"algorithm.candidate_scores={broken}")


def test_grpo_trains_on_mixed_prompts_only(run_stage, reward_calls, tmp_path):
    run = run_stage
    assert run("01_prepare_dataset.py") == 0
    assert run("03_sft_train.py", "--quick_test", "--max_steps", "1", "--skip_validation") == 0
    ids = [row["id"] for row in load_processed(run.root / "processed" / "train.jsonl")]
    scores = write_scores(tmp_path / "scores.jsonl", {ids[0]: [0.0, 0.0], ids[4]: [0.0, 0.3], ids[7]: [1.0, 0.0]})
    assert run("06_train_grpo.py", "--quick_test", "--steps", "2", "--train_prompts", "mixed",
               "--set", f"algorithm.candidate_scores={scores}") == 0
    manifest = read_manifest(run.stage_dir("06_grpo"))
    assert manifest["metrics"]["train_prompts"] == "mixed" and manifest["metrics"]["train_examples"] == 2
    assert manifest["inputs"]["candidate_scores"]["path"] == str(scores)
    assert reward_calls and all(set(call["id"]) <= {ids[4], ids[7]} for call in reward_calls)


def test_grpo_from_an_earlier_sft_checkpoint_with_its_own_reward_weights(run_stage, reward_calls, capsys):
    """The two levers a registry variant sets by config: algorithm.sft_checkpoint (a checkpoint inside the run's
    03_sft) and algorithm.reward_weights (put in place of the run's reward spec's, for this method only)."""
    run = run_stage
    assert run("01_prepare_dataset.py") == 0
    assert run("02_build_rewards.py") == 0
    assert run("03_sft_train.py", "--quick_test", "--max_steps", "4", "--skip_validation") == 0  # saves 2 and 4
    earlier = run.stage_dir("03_sft") / "ckpt_sft" / "checkpoints" / "checkpoint-2"
    assert earlier.is_dir()
    missing = ("--set", "algorithm.sft_checkpoint=ckpt_sft/checkpoints/checkpoint-3", "--output_dir",
               str(run.root / "missing"))
    assert run("06_train_grpo.py", "--quick_test", *missing) == 1
    err = capsys.readouterr().err
    assert "error: algorithm.sft_checkpoint" in err and "checkpoint-3: folder not found" in err
    assert read_manifest(run.root / "missing")["status"] == "failed"
    merged = run.stage_dir("03_sft") / "merged"  # a model folder, not an adapter: the error names the config key
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"")
    assert run("06_train_grpo.py", "--quick_test", "--set", "algorithm.sft_checkpoint=merged",
               "--output_dir", str(run.root / "merged_out")) == 1
    err = capsys.readouterr().err
    assert f"error: algorithm.sft_checkpoint {merged}: expected a LoRA adapter folder" in err

    assert run("06_train_grpo.py", "--quick_test", "--steps", "1",
               "--set", "algorithm.sft_checkpoint=ckpt_sft/checkpoints/checkpoint-2",
               "--set", "algorithm.reward_weights={partial_program: 0.6}") == 0
    manifest = read_manifest(run.stage_dir("06_grpo"))
    assert manifest["inputs"]["policy"]["path"] == str(earlier)
    weights = manifest["reward_weights"]["weights"]
    assert weights["partial_program"] == 0.6 and weights["exact"] == 1.0
    assert reward_calls and all(call["weights"].partial_program == 0.6 for call in reward_calls)
    assert manifest["inputs"]["reward_spec"]["path"].endswith("02_rewards/reward_spec.yaml")


# ----------------------------------------------------------------------------------------------------------
# rollouts served from the project's generation path

class _GRPOLike:
    def __init__(self):
        self.state = SimpleNamespace(global_step=0)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        raise AssertionError("trl's own generation ran")


class _RLOOLike(_GRPOLike):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        raise AssertionError("trl's own generation ran")


@pytest.mark.parametrize("trainer_class", [_GRPOLike, _RLOOLike])
def test_rollouts_come_in_trls_order_and_shape(tiny_model_dir, trainer_class):
    from peft import get_peft_model

    tokenizer = load_tokenizer(tiny_model_dir)
    config = load_config("configs/models/smollm2-135m.yaml", "configs/algorithms/grpo.yaml", True,
                         [f"model.path={tiny_model_dir}", "algorithm.max_completion_length=6"])
    policy = get_peft_model(load_model(tiny_model_dir, trainable=True), lora_config(config))
    trainer = trainer_class()
    settings = rl_trl.rollout_settings(config, rl_trl.rollout_budget(config))
    assert settings.do_sample and not settings.stop_at_json_end and settings.max_new_tokens == 6
    rl_trl.serve_rollouts(trainer, MergedCopy(policy), tokenizer, settings)
    first, second = (tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False) for text in ("what is 1 + 2?", "say hello"))
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (first, second)]
    torch.manual_seed(0)
    out = trainer._generate_single_turn([ids[0]] * 3 + [ids[1]] * 3, None, {}, *([3] if trainer_class is _GRPOLike
                                                                                   else []))
    completion_ids, logprobs = out if trainer_class is _GRPOLike else (out, None)
    assert len(completion_ids) == 6 and logprobs is None
    stops = set(stop_token_ids(tokenizer))
    for completion in completion_ids:  # up to and including the stop token, as trl's own path returns them
        assert 1 <= len(completion) <= 6 and all(isinstance(t, int) for t in completion)
        assert len(completion) == 6 or completion[-1] in stops
        assert not any(t in stops for t in completion[:-1])


def _scoring_batch(pad_id: int):
    """trl's layout (utils.ppo.pad_batch): left-padded prompts, right-padded completions; two prompts with three
    completions each and one prompt alone, shuffled as trl shuffles a generation batch into micro-batches."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (9, 6, 7)]
    rows = []
    for prompt, n_completions in zip(prompts, (3, 3, 1)):
        for _ in range(n_completions):
            n = int(torch.randint(1, 6, (1,), generator=generator))
            rows.append((prompt, torch.randint(3, 200, (n,), generator=generator).tolist()))
    rows = [rows[i] for i in (3, 0, 6, 5, 1, 4, 2)]
    return pad_batch([prompt for prompt, _ in rows], [completion for _, completion in rows], pad_id)


@pytest.mark.parametrize("trainer_name", ["GRPOTrainer", "RLOOTrainer"])
def test_shared_prompt_scoring_matches_trl(tiny_model_dir, trainer_name):
    """score_shared_prompts gives trl's log-probabilities, entropies and LoRA gradients, in trl's row order, with
    the adapter on (training pass) and off (reference pass), and hands back to trl's own path where it must."""
    import trl
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    config = load_config("configs/models/smollm2-135m.yaml", "configs/algorithms/grpo.yaml", True,
                         [f"model.path={tiny_model_dir}"])
    model = load_model(tiny_model_dir, trainable=True)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    policy = get_peft_model(model, lora_config(config))
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # a trained adapter: B = 0 would hide a wrong gradient path
            torch.nn.init.normal_(parameter, std=0.05)
    policy.train()
    # float32 (accelerate's process-wide state keeps an earlier test's bf16 autocast), nothing to unwrap
    scorer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext, unwrap_model=lambda m: m,
                                                         is_main_process=True))
    trls = getattr(trl, trainer_name)._get_per_token_logps_and_entropies
    scorer._get_per_token_logps_and_entropies = lambda *args, **kwargs: trls(scorer, *args, **kwargs)
    calls = []
    original = scorer._get_per_token_logps_and_entropies
    scorer._get_per_token_logps_and_entropies = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    rl_trl.score_shared_prompts(scorer)
    ids, mask, completion_mask = _scoring_batch(load_tokenizer(tiny_model_dir).pad_token_id)
    n, completion_mask = completion_mask.shape[1], completion_mask.bool()
    assert [len(g) for g in rl_trl.prompt_groups(ids[:, :-n], mask[:, :-n])] == [3, 3, 1]

    def scored(function):
        policy.zero_grad()
        logps, entropies, _ = function(policy, ids, mask, n, batch_size=2, compute_entropy=True)
        (logps[completion_mask].sum() + entropies[completion_mask].sum()).backward()
        grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
        return logps.detach(), entropies.detach(), grads

    shared, calls_before = scored(scorer._get_per_token_logps_and_entropies), len(calls)
    reference = scored(lambda *a, **k: trls(scorer, *a, **k))
    assert calls_before == 0  # the shared path ran, not trl's
    torch.testing.assert_close(shared[0][completion_mask], reference[0][completion_mask], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared[1][completion_mask], reference[1][completion_mask], atol=1e-5, rtol=1e-4)
    assert shared[2].keys() == reference[2].keys() and len(shared[2]) > 0
    for name, grad in reference[2].items():  # float32 rounding: ~4e-7 of the norm
        assert float((shared[2][name] - grad).norm() / grad.norm()) < 1e-5, name

    with torch.no_grad(), policy.disable_adapter():  # the reference pass
        off, _, _ = scorer._get_per_token_logps_and_entropies(policy, ids, mask, n, batch_size=1)
        off_trl, _, _ = trls(scorer, policy, ids, mask, n, batch_size=1)
    torch.testing.assert_close(off[completion_mask], off_trl[completion_mask], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(off[completion_mask], shared[0][completion_mask], atol=1e-3)  # the adapter mattered

    # trl's own path where sharing is not the same computation or saves nothing
    policy.gradient_checkpointing_enable()
    scorer._get_per_token_logps_and_entropies(policy, ids, mask, n, batch_size=2)
    policy.gradient_checkpointing_disable()
    scorer._get_per_token_logps_and_entropies(policy, ids[[0, 2]], mask[[0, 2]], n, batch_size=2)
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------------------
# a toy task: both methods must raise the reward

@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_toy_task_reward_rises(tiny_model_dir, tmp_path, method):
    """Reward: the fraction of generated tokens from a fixed half of the vocabulary (those whose embedding has a
    positive first coordinate, so one direction of the hidden state favours them all). The fixture's embeddings are
    scaled up so that a LoRA adapter can move the output distribution at all."""
    from datasets import Dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.mul_(10.0)
        good = set((embeddings[:, 0] > 0).nonzero().view(-1).tolist())

    def reward_good(completions, completion_ids, **kwargs):
        return [sum(token in good for token in ids) / max(len(ids), 1) for ids in completion_ids]

    config = load_config("configs/models/smollm2-135m.yaml", f"configs/algorithms/{method}.yaml", True, [
        f"model.path={tiny_model_dir}", "algorithm.steps=25", "algorithm.prompts_per_step=4",
        "algorithm.num_generations=8", "algorithm.max_completion_length=8", "algorithm.learning_rate=0.02",
        "algorithm.beta=0.0", "algorithm.temperature=1.0", "algorithm.top_p=1.0", "algorithm.micro_batch_size=32"])
    stage = {"grpo": "06_train_grpo.py", "rloo": "07_train_rloo.py"}[method]
    spec = getattr(load_stage(stage), method.upper())  # the stage's own RLMethod
    recorder = RewardRecorder([reward_good], group_size=8)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {i}"}], "id": str(i)}
                                 for i in range(16)])
    trainer = rl_trl.make_trainer(spec, model, tokenizer, dataset, recorder.functions,
                                  rl_trl.trl_arguments(spec, config, tmp_path, 0, torch.device("cpu")),
                                  peft_config=lora_config(config))
    # the stages' rollouts: the project's generation on a merged copy, refreshed after every step (a stale copy
    # would keep sampling the first policy, and the sampled reward could not rise)
    rl_trl.serve_rollouts(trainer, MergedCopy(trainer.model), tokenizer,
                          rl_trl.rollout_settings(config, rl_trl.rollout_budget(config)))
    trainer.train()
    rewards = [record["reward"] for record in trainer.state.log_history if "reward" in record]
    assert len(rewards) == 25
    assert np.mean(rewards[-5:]) > np.mean(rewards[:3]) + 0.2, rewards
    # rewards sit around 0.5 and above: the leave-one-out baseline removes that offset
    summary = recorder.advantage_variance()["summary"]
    assert summary["mean_square_ratio_loo_over_reinforce"] < 1
