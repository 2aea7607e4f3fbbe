"""PPO (utils/ppo.py, 05_train_ppo.py): the pure functions against values worked out by hand, a learning test on
the tiny model with an easy reward, and the stage end to end (then evaluated by 10_evaluate.py)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from utils.config import ConfigError, load_config
from utils.ppo import (AdaptiveKLController, FixedKLController, PolicyWithValue, PPOSettings, PPOTrainer, ValueHead,
                       compute_gae, entropy_from_logits, explained_variance, gather_logprobs, kl_estimate, masked_mean,
                       masked_whiten, pad_batch, policy_loss, shared_prefix, token_rewards, value_loss)
from utils.runs import read_manifest

PPO_CONFIG = REPO / "configs" / "algorithms" / "ppo.yaml"
MODEL_CONFIG = REPO / "configs" / "models" / "smollm2-135m.yaml"


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected) -> bool:
    torch.testing.assert_close(actual, t(expected), atol=1e-6, rtol=0)
    return True


# --- pure functions --------------------------------------------------------------------------------------

def test_masked_mean_and_whiten():
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[1, 0], [1, 1]]), dim=1).tolist() == [1.0, 6.0]
    # mean 2, unbiased variance ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1: whitened = x - 2; padding -> 0
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    # unbiased variance of [2, 4, 6, 8] = 20 / 3: (x - 5) / sqrt(20 / 3)
    y = masked_whiten(t([[2.0, 4.0], [6.0, 8.0]]), t([[1, 1], [1, 1]]))
    s = math.sqrt(20 / 3)
    assert close(y, [[-3 / s, -1 / s], [1 / s, 3 / s]])


def test_gae_by_hand():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [0.2, 0.3, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # row 2 ends after 2 tokens: its third reward/value are padding
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1, gamma * lam = 0.72:
    #   t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3;                A = 0.3
    #   t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;             A = 0.03 + 0.72 * 0.3 = 0.246
    #   t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;             A = 0.04 + 0.72 * 0.246 = 0.21712
    # row 2: t=1: delta = 2 + 0.9 * 0 - 0.3 = 1.7 (V beyond the end is 0, not the pad's 9.0); A = 1.7
    #        t=0: delta = 0 + 0.9 * 0.3 - 0.2 = 0.07;        A = 0.07 + 0.72 * 1.7 = 1.294
    assert close(advantages, [[0.21712, 0.246, 0.3], [1.294, 1.7, 0.0]])
    assert close(returns, [[0.71712, 0.846, 1.0], [1.494, 2.0, 0.0]])
    # gamma = lam = 1: every advantage is the (undiscounted) reward-to-go minus the value
    advantages, returns = compute_gae(t([[0.1, 0.2, 0.3]]), t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]]), 1.0, 1.0)
    assert close(advantages, [[0.6 - 1.0, 0.5 - 2.0, 0.3 - 3.0]])
    assert close(returns, [[0.6, 0.5, 0.3]])


def test_clipped_surrogate_inside_and_outside_the_clip_range():
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 3.0]
    advantages = t([[2.0, 2.0, -2.0, -2.0, 2.0, 99.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])  # the last token is padding
    old = t([[-1.0] * 6])
    new = old + torch.log(t([ratios]))
    loss, stats = policy_loss(new, old, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+2 r=1.1 inside       -> -2.2
    #   A=+2 r=1.5 above        -> max(-3.0, -2.4) = -2.4   (clipped)
    #   A=-2 r=0.5 below        -> max( 1.0,  1.6) =  1.6   (clipped)
    #   A=-2 r=1.5 above        -> max( 3.0,  2.4) =  3.0   (not clipped: pessimistic side)
    #   A=+2 r=0.5 below        -> max(-1.0, -1.6) = -1.0   (not clipped)
    assert loss.item() == pytest.approx((-2.2 - 2.4 + 1.6 + 3.0 - 1.0) / 5, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    # approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (0.0953102^2 + 2 * 0.4054651^2 + 2 * 0.6931472^2) / 5
    assert stats["approx_kl"].item() == pytest.approx(0.1298794, abs=1e-6)
    # ratio 1 everywhere: the loss is -mean(A) and nothing is clipped
    loss, stats = policy_loss(old, old, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(2 + 2 - 2 - 2 + 2) / 5) and stats["clipfrac"].item() == 0.0
    # gradient flows only through unclipped tokens
    new = new.clone().requires_grad_(True)
    policy_loss(new, old, advantages, mask, 0.2)[0].backward()
    assert (new.grad[0, [1, 2, 5]] == 0).all() and (new.grad[0, [0, 3, 4]] != 0).all()


def test_clipped_value_loss():
    old_values = t([[1.0, 1.0, 1.0, 1.0]])
    values = t([[1.1, 1.5, 1.5, 7.0]])
    returns = t([[2.0, 2.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # V=1.1 R=2 inside:       (1.1-2)^2 = 0.81 both ways                 -> 0.81
    # V=1.5 R=2: unclipped 0.25, clipped V=1.2 -> 0.64                   -> 0.64 (clipped one counts)
    # V=1.5 R=1: unclipped 0.25, clipped V=1.2 -> 0.04                   -> 0.25
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 0.25) / 3, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_kl_estimators_and_entropy_and_explained_variance():
    k1, k3 = kl_estimate(t([[-1.0, -2.0]]), t([[-1.5, -1.0]]))
    assert close(k1, [[0.5, -1.0]])
    # k3 = exp(ref - logp) - 1 - (ref - logp): exp(-0.5) - 1 + 0.5 = 0.1065307; exp(1) - 1 - 1 = 0.7182818
    assert close(k3, [[0.1065307, 0.7182818]])
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(t([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)
    returns, mask = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    # residuals (1, 0, -1) have the variance of the returns (1): 1 - 1 / 1 = 0
    assert explained_variance(t([[0.0, 2.0, 4.0, 0.0]]), returns, mask).item() == pytest.approx(0.0)


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(t([1.0, -0.2]), kl, mask, kl_coef=0.5)
    assert close(rewards, [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 0.2, 0.0]])


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(9.0, 100)  # error 9/6 - 1 = 0.5, clipped to 0.2: x (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.05 * 1.002)
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(6.6, 100)  # error 0.1: x 1.001
    assert ctl.value == pytest.approx(0.05 * 1.001)
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(0.0, 100)  # error -1, clipped to -0.2: x 0.998
    assert ctl.value == pytest.approx(0.05 * 0.998)


def test_pad_batch_and_value_head():
    input_ids, attention, response_mask = pad_batch([[5, 6, 7], [8]], [[1], [2, 3]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 1, 0], [0, 0, 8, 2, 3]]
    assert attention.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert response_mask.tolist() == [[1, 0], [1, 1]]
    head = ValueHead(8, dropout=0.1)
    assert head(torch.randn(2, 3, 8)).shape == (2, 3) and head(torch.randn(2, 3, 8)).abs().sum() == 0


def test_pad_batch_keeps_a_shared_prefix_in_the_first_columns():
    queries, responses = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7]], [[1], [2, 3], [4]]
    assert shared_prefix(queries) == 2 and shared_prefix(queries[:1]) == 0
    assert shared_prefix([[5, 6], [5, 6]]) == 1  # each query keeps one token of its own
    input_ids, attention, response_mask = pad_batch(queries, responses, pad_id=0, prefix_length=2)
    assert input_ids.tolist() == [[5, 6, 7, 8, 1, 0], [5, 6, 0, 9, 2, 3], [5, 6, 0, 7, 4, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1], [1, 1, 0, 1, 1, 0]]
    assert response_mask.tolist() == [[1, 0], [1, 1], [1, 0]]


def trained_looking_policy(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B is not zero (B = 0 would hide a wrong gradient path)."""
    from peft import get_peft_model

    from utils.models import load_model, lora_config

    torch.manual_seed(0)
    config = load_config(MODEL_CONFIG, PPO_CONFIG, named={"model.path": str(tiny_model_dir)})
    policy = get_peft_model(load_model(tiny_model_dir), lora_config(config))
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return policy, config


def test_shared_prefix_forward_matches_whole_rows(tiny_model_dir, one_thread):
    """PolicyWithValue with the queries' shared prefix forwarded once gives the logits, values and LoRA and value
    head gradients of forwarding every row whole (float32), with the adapter on and off."""
    policy, _ = trained_looking_policy(tiny_model_dir)
    model = PolicyWithValue(policy, value_head_dropout=0.0)
    torch.nn.init.normal_(model.value_head.linear.weight, std=0.1)
    model.eval()
    prefix = torch.randint(10, 200, (6,)).tolist()
    queries = [prefix + torch.randint(10, 200, (n,)).tolist() for n in (5, 2, 8)]
    responses = [torch.randint(10, 200, (n,)).tolist() for n in (3, 6, 1)]
    width = max(map(len, responses))
    mask = pad_batch(queries, responses, 0)[2].bool()

    def forward(prefix_length: int):
        model.zero_grad()
        input_ids, attention_mask, _ = pad_batch(queries, responses, 0, prefix_length=prefix_length)
        logits, values = model(input_ids, attention_mask, width, prefix_length)
        (gather_logprobs(logits, input_ids[:, -width:])[mask].sum() + values[mask].sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logits.detach()[mask], values.detach()[mask], grads

    assert shared_prefix(queries) == 6
    shared, whole = forward(6), forward(0)
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared[1], whole[1], atol=1e-5, rtol=1e-4)
    assert shared[2].keys() == whole[2].keys() and any("lora_A" in name for name in whole[2])
    for name, grad in whole[2].items():
        assert float((shared[2][name] - grad).norm() / grad.norm()) < 1e-5, name
    with torch.no_grad(), policy.disable_adapter():
        off = [model(*pad_batch(queries, responses, 0, prefix_length=p)[:2], width, p)[0][mask] for p in (6, 0)]
    torch.testing.assert_close(off[0], off[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(off[0], shared[0], atol=1e-3)  # the adapter mattered


def test_rollout_passes_put_each_row_back_in_its_place(tiny_model_dir, one_thread):
    """The no-grad passes batch rows of similar length (shared prefix, padding after it): each row's log-probs and
    values are those of the row forwarded alone."""
    from utils.generation import GenerationSettings
    from utils.models import load_tokenizer

    policy, config = trained_looking_policy(tiny_model_dir)
    settings = PPOSettings.from_config({**config["algorithm"], "rollout_batch_size": 6, "mini_batch_size": 2})
    trainer = PPOTrainer(policy, load_tokenizer(tiny_model_dir), None, settings,
                         GenerationSettings(max_new_tokens=4, do_sample=True, temperature=0.7), seed=0)
    torch.nn.init.normal_(trainer.unwrapped.value_head.linear.weight, std=0.1)
    prefix = torch.randint(10, 200, (5,)).tolist()
    queries = [prefix + torch.randint(10, 200, (n,)).tolist() for n in (7, 1, 4, 9, 2, 3)]
    responses = [torch.randint(10, 200, (n,)).tolist() for n in (2, 5, 1, 3, 4, 2)]
    for reference in (False, True):
        logprobs, values = trainer._forward_no_grad(queries, responses, reference)
        for row, (query, response) in enumerate(zip(queries, responses)):
            alone_logprobs, alone_values = trainer._forward_no_grad([query], [response], reference)
            torch.testing.assert_close(logprobs[row, :len(response)], alone_logprobs[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(values[row, :len(response)], alone_values[0], atol=1e-5, rtol=1e-4)


def test_settings_from_the_config_file():
    config = load_config(MODEL_CONFIG, PPO_CONFIG, quick_test=True, named={"algorithm.kl_coef": 0.1})
    settings = PPOSettings.from_config(config["algorithm"])
    assert settings.steps == 2 and settings.ppo_epochs == 1 and settings.kl_coef == 0.1
    full = PPOSettings.from_config(load_config(MODEL_CONFIG, PPO_CONFIG)["algorithm"])
    assert (full.ppo_epochs, full.clip_range, full.gamma, full.lam, full.whiten_advantages) == (4, 0.2, 1.0, 0.95,
                                                                                                  True)
    with pytest.raises(ConfigError, match="multiple of"):
        PPOSettings.from_config({**config["algorithm"], "rollout_batch_size": 5})
    with pytest.raises(ConfigError, match="algorithm.nope"):
        PPOSettings.from_config({**config["algorithm"], "nope": 1})


@pytest.fixture
def one_thread():
    """The tiny model's many small ops run faster on one thread, and far faster than two on a shared 2-core
    machine (where two busy threads per process stall each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- learning test ---------------------------------------------------------------------------------------

class StartsWithLowercase:
    """A toy reward: 1 when the completion starts with a lowercase ASCII letter (about a third of the tiny
    random model's first tokens), else 0."""

    def score_example(self, completion: str, row: dict):
        ok = completion[:1].isascii() and completion[:1].islower()
        return SimpleNamespace(total=1.0 if ok else 0.0, format_ok=ok)

    def for_training(self, results: list, step: int | None = None) -> list:  # (no control: the rewards as scored)
        return results


def test_ppo_raises_an_easy_reward(tiny_model_dir, one_thread):
    from peft import LoraConfig, get_peft_model

    from utils.generation import GenerationSettings
    from utils.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    # The random tiny model's (tied) embeddings have std 0.02, which caps its logits near +-0.6: no adapter could
    # move its next-token distribution far. Scaled up, its logits span a few nats, like a trained model's.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    policy = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                              target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    defaults = load_config(REPO / "configs/models/smollm2-135m.yaml", REPO / "configs/algorithms/ppo.yaml")
    settings = PPOSettings.from_config({**defaults["algorithm"], "steps": 40, "rollout_batch_size": 16,
                                        "mini_batch_size": 8, "ppo_epochs": 4, "learning_rate": 3e-3,
                                        "kl_coef": 0.01, "value_head_dropout": 0.0,
                                        "gradient_accumulation_steps": 1})
    generation = GenerationSettings(max_new_tokens=2, batch_size=16, do_sample=True, temperature=1.0, top_p=1.0,
                                    stop_at_json_end=False)
    trainer = PPOTrainer(policy, tokenizer, StartsWithLowercase(), settings, generation, seed=0)
    # short prompts (rendered strings) keep it fast; the chat messages of real rows work the same way
    rows = [{"prompt": f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n"} for i in range(16)]
    history = [trainer.step(rows) for _ in range(settings.steps)]
    first = sum(h["reward_mean"] for h in history[:5]) / 5
    last = sum(h["reward_mean"] for h in history[-10:]) / 10
    curve = [round(h["reward_mean"], 2) for h in history]
    assert first < 0.5 and last > 0.6 and last > first + 0.25, curve
    assert history[-1]["kl"] > 0 and history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts at 0
    assert history[0]["reward_format_ok"] == pytest.approx(history[0]["reward_mean"])
    assert all(math.isfinite(h["policy_loss"]) and math.isfinite(h["value_loss"]) for h in history)


# --- the stage -------------------------------------------------------------------------------------------

STATS_KEYS = {"step", "reward_mean", "reward_std", "reward_format_ok", "reward_exec_match", "reward_numeric_match",
              "reward_partial_program", "reward_program_valid", "kl", "kl_coef", "entropy", "policy_loss",
              "value_loss", "clipfrac", "approx_kl", "explained_variance", "advantage_mean", "advantage_std",
              "response_length_mean", "time_generation_s", "time_reward_s", "time_training_s", "n_prompts",
              "n_completions", "n_generated_tokens"}


def test_ppo_stage_then_evaluate(run_stage, one_thread):
    from safetensors.torch import load_file

    one = ("--set", "model.torch_threads=1")
    assert run_stage("01_prepare_dataset.py", *one) == 0
    assert run_stage("02_build_rewards.py", *one) == 0
    assert run_stage("03_sft_train.py", *one, "--quick_test", "--skip_validation",
                     "--set", "algorithm.max_steps=1") == 0
    assert run_stage("05_train_ppo.py", *one, "--quick_test", "--steps", "2", "--learning_rate", "1e-3",
                     "--set", "algorithm.eval_every_steps=1") == 0

    out = run_stage.stage_dir("05_ppo")
    manifest = read_manifest(out)
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    assert metrics["steps"] == 2 and metrics["prompts_per_step"] == 4 and metrics["completions_per_step"] == 4
    assert metrics["total_completions"] == 8 and metrics["total_generated_tokens"] > 0
    for key in ("initial_val_reward", "final_val_reward", "initial_val_parse_rate", "final_val_parse_rate",
                "final_kl", "wall_time_s"):
        assert key in metrics

    for name in ("final", "best"):
        ckpt = out / "ckpt_ppo" / name
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "value_head.pt").is_file()
        adapters = json.loads((ckpt / "base_adapters.json").read_text())["adapters"]
        assert adapters == [str(run_stage.stage_dir("03_sft") / "ckpt_sft" / "best")]
    weights = load_file(out / "ckpt_ppo" / "final" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # LoRA B starts at zero: it trained
    assert torch.load(out / "ckpt_ppo" / "final" / "value_head.pt")["linear.weight"].abs().sum() > 0

    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2] and STATS_KEYS <= set(log[0])
    for step in (0, 1, 2):
        record = json.loads((out / "val_generations" / f"step_{step}.json").read_text())
        assert record["summary"]["n_examples"] == 4 and len(record["samples"]) == 4

    assert run_stage("10_evaluate.py", *one, "--label", "ppo", "--quick_test") == 0
    evaluation = read_manifest(run_stage.stage_dir("10_evaluation") / "ppo")
    assert evaluation["status"] == "completed"
    assert evaluation["checkpoint"].endswith("05_ppo/ckpt_ppo/final")

    # the same stage on two processes (torchrun, gloo on the CPU) through the driver's --launcher: one manifest and
    # one checkpoint, written by the main process, with both processes' rollouts counted
    from utils.driver import main as driver_main

    out_lines: list[str] = []
    driver = ["--method", "ppo", "--quick_test", *run_stage.base, "--stages", "05_ppo"]
    two = ["--launcher", "torchrun --standalone --nproc_per_node 2"]
    assert driver_main([*driver, *two], echo=out_lines.append) == 0, "".join(out_lines)
    assert "ran on 1 process(es), --launcher asks for 2" in "".join(out_lines)
    manifest = read_manifest(out)
    assert manifest["status"] == "completed" and manifest["metrics"]["processes"] == 2
    assert manifest["metrics"]["total_completions"] == 2 * 2 * 4  # 2 steps x 2 processes x 4 prompts each
    assert (out / "ckpt_ppo" / "final" / "value_head.pt").is_file()
    run_manifest = json.loads((run_stage.root / "outputs" / "run_001" / "run_manifest.json").read_text())
    assert run_manifest["launcher"] == {"command": "torchrun --standalone --nproc_per_node 2", "processes": 2,
                                        "stages": ["05_ppo"]}
    out_lines.clear()
    assert driver_main([*driver, *two, "--dry_run"], echo=out_lines.append) == 0
    assert "0 to run, 1 up to date" in "".join(out_lines)
    out_lines.clear()
    assert driver_main([*driver, "--dry_run"], echo=out_lines.append) == 0
    assert "ran on 2 process(es), --launcher asks for 1" in "".join(out_lines)
