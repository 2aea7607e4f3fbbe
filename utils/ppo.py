"""PPO with a value head on the project's rule-based reward (trl no longer ships PPO; this replaces it).

Design
------
- Policy: the SFT model with its LoRA merged in (utils.models.merged_policy_base) plus one new trainable LoRA
  adapter (peft get_peft_model with utils.models.lora_config). Only the adapter and the value head train.
- Reference policy: the same model with the adapter switched off (`with policy.disable_adapter():`), i.e.
  exactly the SFT model, so there is no second copy of the weights in memory for it.
- Rollouts: sampled from a merged copy of the policy (utils.models.MergedCopy, refreshed after each update), which
  decodes without the adapter's extra matmuls; log-probs, reference log-probs and values come from the policy
  itself, so the first probability ratio is still 1 (to rounding).
- Value head: dropout + Linear(hidden, 1) on the policy's last hidden states (after the final norm), shared
  trunk with the policy (as trl's AutoModelForCausalLMWithValueHead). It is zero-initialised, so the first
  values are 0, and kept in float32 whatever the model's dtype. Policy and value head live in one module
  (PolicyWithValue) so one accelerator.prepare / DDP wrapper covers both.
- Shared prefix: every query starts with the same system prompt and instructions; the no-grad passes run those
  tokens once per pass, a training micro-batch (of three rows or more) once for its rows, and each row's own
  tokens on their keys and values (PolicyWithValue.forward; pad_batch puts the padding after them). The same
  outputs and gradients as whole rows, in fewer FLOPs.
- Reward: the calculator's scalar score is added at the last response token; every response token also gets
  the KL penalty -kl_coef * (logp - ref_logp) (the k1 estimator; k3 is logged). kl_coef is fixed or adapted
  towards a target KL (Ziegler et al. 2019).
- Advantages: token-level GAE (gamma, lam) on the per-token rewards and the value head's predictions,
  whitened over the rollout; returns = advantages + values (before whitening).
- Update: ppo_epochs passes over shuffled minibatches of the rollout, clipped surrogate policy loss +
  vf_coef * clipped value loss, gradient clipping, AdamW over the LoRA parameters and the value head.

Implementation details (after trl's old PPOTrainer and "The N implementation details of RLHF with PPO"):
logprobs are taken from logits divided by the sampling temperature; dropout is off in the policy (it is kept
in eval mode, so the first minibatch's probability ratio is 1), the value head keeps its own dropout;
position ids follow the attention mask, as in generation, so left padding does not shift positions; Adam eps
1e-5; advantages are whitened with the mean shifted, rewards are not; values are clipped around the rollout's
values. The sampled responses are scored as returned by utils.generation (up to and including a stop token).

With several processes (`accelerate launch`), each process rolls out its own rollout_batch_size prompts, and
gradients are averaged by DDP; logged figures are averaged over processes (counts are summed). DeepSpeed is
refused (refuse_deepspeed).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from utils.config import ConfigError
from utils.generation import GenerationSettings, GenerationStats, generate, shared_prefix_length
from utils.models import MergedCopy, last_positions, prefix_cache, rows_cache
from utils.prompts import render_prompt
from utils.runs import StageError

REWARD_COMPONENTS = ("format_ok", "program_valid", "exec_match", "numeric_match", "partial_program")
VALUE_HEAD_FILE = "value_head.pt"
PPO_STATE_FILE = "ppo_state.pt"  # a resumable checkpoint (PPOTrainer.save_state), beside rng_state_<rank>.pt


# --- settings ------------------------------------------------------------------------------------------

@dataclass
class PPOSettings:
    """configs/algorithms/ppo.yaml, every key required (the defaults live in that file only)."""

    steps: int
    rollout_batch_size: int
    mini_batch_size: int
    gradient_accumulation_steps: int
    ppo_epochs: int
    learning_rate: float
    clip_range: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    kl_coef: float
    adaptive_kl: bool
    kl_target: float
    kl_horizon: int
    whiten_advantages: bool
    max_grad_norm: float
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    eval_every_steps: int
    n_val_examples: int
    value_head_dropout: float
    max_train_examples: int | None
    train_prompts: str
    candidate_scores: str | None
    save_every_steps: int          # resumable checkpoints (PPOTrainer.save_state)
    sft_checkpoint: str | None     # the policy it starts from and its reward: read by utils.stage_inputs
    reward_weights: dict
    reward_control: str

    @classmethod
    def from_config(cls, algo: dict) -> "PPOSettings":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(algo))
        unknown = sorted(set(algo) - names)
        if missing:
            raise ConfigError(f"algorithm config lacks {', '.join('algorithm.' + k for k in missing)}")
        if unknown:
            raise ConfigError(f"unknown PPO key(s): {', '.join('algorithm.' + k for k in unknown)}")
        return cls(**{name: algo[name] for name in names})

    def __post_init__(self):  # single values are checked with the config (utils.config.RULES); these relate two
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(f"algorithm.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"algorithm.mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(f"algorithm.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                              f"algorithm.gradient_accumulation_steps ({self.gradient_accumulation_steps})")


def refuse_deepspeed() -> None:
    """PPO's loop does not run under DeepSpeed: one `error:` line before anything loads, never a crash at start."""
    # `accelerate launch` with a DEEPSPEED config sets this (accelerate/utils/launch.py, prepare_deepspeed_cmd_env)
    # and Accelerator() turns it into DistributedType.DEEPSPEED (accelerate/state.py), so it is read the same way.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError(
            "05_train_ppo.py does not run under DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, e.g. accelerate launch "
            "--config_file configs/accelerate/deepspeed_zero2.yaml): its loop prepares no DataLoader, so DeepSpeed's "
            "train_micro_batch_size_per_gpu: auto cannot be resolved, and DeepSpeed's backward steps the optimizer "
            "on every micro-batch instead of once per minibatch; run it under configs/accelerate/multi_gpu.yaml "
            "(DDP) or single_gpu.yaml")


# --- pure functions (tensors of shape (batch, response tokens), mask 1 = real token, 0 = padding) -------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the unmasked entries; Bessel-corrected when unbiased (and there are at least two)."""
    centered = x - masked_mean(x, mask)
    variance = masked_mean(centered ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries (mean added back when not shift_mean); 0 beyond the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, token by token from the end:
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns = A + V,
    with V and A taken as 0 beyond the last real token (the episode ends there). Both are 0 beyond the mask."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    n = values.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token estimators of KL(policy || ref) on tokens sampled from the policy: (k1, k3).
    k1 = logp - ref_logp (unbiased, can be negative; used in the reward penalty);
    k3 = (r - 1) - log r with r = exp(ref_logp - logp) (unbiased, always >= 0; logged)."""
    k1 = logprobs - ref_logprobs
    log_r = -k1
    k3 = torch.expm1(log_r) - log_r
    return k1, k3


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * kl on every response token, plus each sequence's scalar score on its last real token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # responses are right-padded
    rewards[torch.arange(len(score)), last] += score.to(rewards.dtype)
    return rewards


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(z) - sum(p * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 = values predict returns perfectly, 0 = no better than
    their mean, negative = worse."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask) / var_returns


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon),
    n_steps = sequences in the rollout just used."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# --- model ---------------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """V(state) from the last hidden state: dropout + Linear(hidden, 1), zero-initialised, float32."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden.float())).squeeze(-1)


class PolicyWithValue(nn.Module):
    """The peft policy and its value head; forward gives the logits and values at the response positions."""

    def __init__(self, policy, value_head_dropout: float = 0.1, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(policy.config.get_text_config().hidden_size, value_head_dropout)
        self.compute_dtype = compute_dtype  # the policy runs under autocast to it; the value head in float32

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                prefix_length: int = 0, prefix: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids: pad_batch's [shared prefix | left-padded rest of the query | right-padded response], the
        response in the last n_response columns. Returns logits (b, n_response, vocab) predicting each response
        token and values (b, n_response) of the states before it (both from position t - 1, as a causal LM predicts
        token t). The first prefix_length columns, the same in every row, are forwarded once: the same outputs and
        gradients as forwarding every row whole, in fewer FLOPs. prefix: their keys and values when already
        computed (prefix_cache; a no-grad pass runs them once for all its chunks)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if prefix_length:
            cache = rows_cache(prefix if prefix is not None else self.prefix(input_ids[:1, :prefix_length]),
                               len(input_ids))
            input_ids, position_ids = input_ids[:, prefix_length:], position_ids[:, prefix_length:]
        with self.autocast():
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=cache is not None,
                              logits_to_keep=last_positions(n_response + 1, input_ids.shape[1], input_ids.device),
                              output_hidden_states=True)
        logits = out.logits[:, :-1].float()
        values = self.value_head(out.hidden_states[-1][:, -(n_response + 1):-1].float())
        return logits, values

    def prefix(self, input_ids: torch.Tensor) -> list:
        """Keys and values of one prefix (input_ids of shape (1, n)), for forward's rows to continue from."""
        with self.autocast():
            return prefix_cache(self.policy, input_ids)

    def autocast(self):
        return torch.autocast(self.value_head.linear.weight.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def train_mode(self) -> None:
        """Dropout off in the policy (ratio 1 on the first minibatch), on in the value head."""
        self.eval()
        self.value_head.train()


def pad_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device | str = "cpu",
              prefix_length: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[pad.. query | response ..pad] so every response starts at the same column; with prefix_length, the queries'
    first prefix_length tokens (the same in each) stay in the first columns, the padding after them:
    [prefix | pad.. rest of query | response ..pad]. Returns input_ids (b, P + R), attention_mask (b, P + R),
    response_mask (b, R)."""
    n_query, n_response = max(map(len, queries)), max(map(len, responses))
    input_ids = torch.full((len(queries), n_query + n_response), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(queries), n_response), dtype=torch.long)
    for i, (query, response) in enumerate(zip(queries, responses)):
        input_ids[i, :prefix_length] = torch.tensor(query[:prefix_length], dtype=torch.long)
        input_ids[i, n_query - len(query) + prefix_length: n_query] = torch.tensor(query[prefix_length:])
        input_ids[i, n_query: n_query + len(response)] = torch.tensor(response)
        attention_mask[i, :prefix_length] = 1
        attention_mask[i, n_query - len(query) + prefix_length: n_query + len(response)] = 1
        response_mask[i, : len(response)] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def shared_prefix(queries: list[list[int]], min_rows: int = 2) -> int:
    """How many leading query tokens a forward over these rows can share (PolicyWithValue.forward): the tokens
    every query starts with (the system prompt and the instructions, ~180 of ~300 here), each query keeping one of
    its own; 0 for fewer than min_rows rows."""
    return shared_prefix_length(queries) if len(queries) >= min_rows else 0


def save_value_head(model: PolicyWithValue, dest: str | Path) -> Path:
    path = Path(dest) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.value_head.state_dict(), path)
    return path


# --- the trainer ---------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One batch of prompts with their sampled responses and everything PPO needs about them."""

    rows: list[dict]
    queries: list[list[int]]
    responses: list[list[int]]
    results: list[Any]            # the reward calculator's result per response
    scores: torch.Tensor          # (b,) total reward
    mask: torch.Tensor            # (b, R) 1 on response tokens
    logprobs: torch.Tensor        # (b, R) under the policy that sampled them
    ref_logprobs: torch.Tensor    # (b, R) under the reference (adapter off)
    values: torch.Tensor          # (b, R)
    rewards: torch.Tensor         # (b, R) KL penalty + score at the end
    advantages: torch.Tensor      # (b, R) whitened when configured
    returns: torch.Tensor         # (b, R)
    n_generated_tokens: int = 0
    n_finished: int = 0


class PPOTrainer:
    """PPO on a peft policy. calculator: anything with score_example(completion_text, row) -> result with
    .total (and optionally the REWARD_COMPONENTS fields) and for_training(results, step) -> the results a step learns
    from (utils.reward.RewardCalculator); rows are processed rows (their "prompt" is rendered with the tokenizer's
    chat template) or any dicts the calculator understands, with a "prompt"."""

    def __init__(self, policy, tokenizer, calculator, settings: PPOSettings, generation: GenerationSettings,
                 accelerator=None, seed: int = 0, compute_dtype: torch.dtype = torch.float32):
        from accelerate import Accelerator

        self.tokenizer, self.calculator, self.settings, self.seed = tokenizer, calculator, settings, seed
        self.generation = generation
        self.temperature = generation.temperature if generation.do_sample else 1.0
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        model = PolicyWithValue(policy, settings.value_head_dropout, compute_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, eps=1e-5, weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.params = params
        self.kl_controller = (AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
                              if settings.adaptive_kl else FixedKLController(settings.kl_coef))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rng = random.Random(seed + 7919 * self.accelerator.process_index)
        self.n_steps = 0
        self.policy_copy = MergedCopy(policy)  # rollouts decode from it (merged adapter, no per-step casts)

    # resuming ---------------------------------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        """Everything the next step depends on: the trainable parameters (the new adapter, the value head), the
        optimizer, the KL coefficient, the step count (it seeds the rollouts) and this process's random streams
        (minibatch order, dropout), so a resumed run continues as this one would have."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            torch.save({"step": self.n_steps, "params": [p.detach().cpu() for p in self.params],
                        "optimizer": self.optimizer.state_dict(), "kl_coef": self.kl_controller.value},
                       folder / PPO_STATE_FILE)
        torch.save({"python": self.rng.getstate(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   folder / f"rng_state_{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()

    def load_state(self, folder: Path) -> int:
        """Continue from save_state's folder; returns the step it was saved after."""
        folder = Path(folder)
        try:  # (the project's own files: pickled Python state besides tensors)
            state = torch.load(folder / PPO_STATE_FILE, weights_only=False)
            streams = torch.load(folder / f"rng_state_{self.accelerator.process_index}.pt", weights_only=False)
            with torch.no_grad():
                if len(state["params"]) != len(self.params):
                    raise ValueError(f"{len(state['params'])} saved parameters for {len(self.params)}")
                for param, saved in zip(self.params, state["params"]):
                    param.copy_(saved)
            self.optimizer.load_state_dict(state["optimizer"])
            self.rng.setstate(streams["python"])
            torch.set_rng_state(streams["torch"])
        except (OSError, KeyError, TypeError, ValueError, RuntimeError, EOFError) as err:
            raise StageError(f"{folder}: not a PPO checkpoint this stage can resume from ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''}); re-run without --resume") from None
        if streams.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(streams["cuda"])
        self.kl_controller.value, self.n_steps = state["kl_coef"], state["step"]
        return self.n_steps

    def generation_model(self, step: int | None = None):
        """The merged copy of the policy as it is after `step` updates (default: now), for generation."""
        return self.policy_copy.model(self.n_steps if step is None else step)

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def policy(self):
        """The peft model (for generation, validation and saving)."""
        return self.unwrapped.policy

    # rollout ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _forward_no_grad(self, queries, responses, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprobs and values of the responses, mini_batch_size rows at a time (rows of similar length together,
        less padding), right-padded to the longest."""
        model, device = self.unwrapped, self.accelerator.device
        model.eval()
        n_response = max(map(len, responses))
        logprobs = torch.zeros(len(queries), n_response, device=device)
        values = torch.zeros(len(queries), n_response, device=device)
        by_length = sorted(range(len(queries)), key=lambda i: len(queries[i]) + len(responses[i]))
        prefix_length = shared_prefix(queries)  # run once for every chunk
        context = model.policy.disable_adapter() if reference else contextlib.nullcontext()
        with context:
            prefix = model.prefix(torch.tensor([queries[0][:prefix_length]], device=device)) if prefix_length else None
            chunk = self.settings.mini_batch_size
            for start in range(0, len(queries), chunk):
                index = by_length[start: start + chunk]
                q, r = [queries[i] for i in index], [responses[i] for i in index]
                input_ids, attention_mask, _ = pad_batch(q, r, self.pad_id, device, prefix_length)
                width = max(map(len, r))
                logits, v = model(input_ids, attention_mask, width, prefix_length, prefix)
                rows = torch.tensor(index, device=device)
                logprobs[rows, :width] = gather_logprobs(logits / self.temperature, input_ids[:, -width:])
                values[rows, :width] = v
        return logprobs, values

    def rollout(self, rows: list[dict], timings: dict) -> Rollout:
        s = self.settings
        texts = [row["prompt"] if isinstance(row["prompt"], str) else render_prompt(self.tokenizer, row["prompt"])
                 for row in rows]
        queries = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

        started = time.time()
        gen_stats = GenerationStats()
        seed = self.seed + 1_000_003 * self.n_steps + 7919 * self.accelerator.process_index
        generations = [group[0] for group in generate(self.generation_model(), self.tokenizer, texts, self.generation,
                                                      seed=seed, stats=gen_stats, show_progress=False)]
        # an empty response still needs one token to carry its score
        responses = [g.token_ids or [self.tokenizer.eos_token_id] for g in generations]
        timings["generation"] = time.time() - started

        started = time.time()
        results = self.calculator.for_training([self.calculator.score_example(g.text, row)
                                                for g, row in zip(generations, rows)], self.n_steps)
        device = self.accelerator.device
        scores = torch.tensor([float(r.total) for r in results], device=device)
        timings["reward"] = time.time() - started

        started = time.time()
        logprobs, values = self._forward_no_grad(queries, responses, reference=False)
        ref_logprobs, _ = self._forward_no_grad(queries, responses, reference=True)
        mask = pad_batch(queries, responses, self.pad_id, device)[2].float()
        logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask
        k1, _ = kl_estimate(logprobs, ref_logprobs)
        rewards = token_rewards(scores, k1, mask, self.kl_controller.value)
        advantages, returns = compute_gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        timings["rollout_forward"] = time.time() - started
        return Rollout(rows=rows, queries=queries, responses=responses, results=results, scores=scores,
                       mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                       advantages=advantages, returns=returns, n_generated_tokens=gen_stats.n_generated_tokens,
                       n_finished=sum(g.finish_reason == "stop" for g in generations))

    # optimisation -------------------------------------------------------------------------------------

    def _micro_batch_loss(self, batch: Rollout, index: list[int]) -> tuple[torch.Tensor, dict]:
        s = self.settings
        queries = [batch.queries[i] for i in index]
        responses = [batch.responses[i] for i in index]
        # with grad the prefix runs once per micro-batch; two rows save one copy of it, which its own forward costs
        # back (bench/bench_ppo_passes.py: 0.92-0.96x), three or more gain (four: 1.20-1.26x)
        prefix = shared_prefix(queries, min_rows=3)
        input_ids, attention_mask, _ = pad_batch(queries, responses, self.pad_id, self.accelerator.device, prefix)
        width = max(map(len, responses))
        rows = torch.tensor(index, device=self.accelerator.device)

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[rows, :width]

        mask = take(batch.mask)
        logits, values = self.model(input_ids, attention_mask, width, prefix)
        logits = logits / self.temperature
        logprobs = gather_logprobs(logits, input_ids[:, -width:])
        pg_loss, pg_stats = policy_loss(logprobs, take(batch.logprobs), take(batch.advantages), mask, s.clip_range)
        vf_loss, vf_stats = value_loss(values, take(batch.values), take(batch.returns), mask, s.cliprange_value)
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy,
                 **pg_stats, **vf_stats}
        return pg_loss + s.vf_coef * vf_loss, stats

    def train_on(self, batch: Rollout) -> dict:
        """ppo_epochs passes over shuffled minibatches; returns the mean of each loss statistic."""
        s = self.settings
        self.unwrapped.train_mode()
        n = len(batch.queries)
        mini = min(s.mini_batch_size, n)
        micro = max(mini // s.gradient_accumulation_steps, 1)
        totals: dict[str, float] = {}
        count, grad_norms = 0, []
        for _ in range(s.ppo_epochs):
            order = list(range(n))
            self.rng.shuffle(order)
            for start in range(0, n, mini):
                minibatch = order[start: start + mini]
                parts = [minibatch[i: i + micro] for i in range(0, len(minibatch), micro)]
                for k, part in enumerate(parts):
                    syncing = k == len(parts) - 1
                    with contextlib.nullcontext() if syncing else self.accelerator.no_sync(self.model):
                        loss, stats = self._micro_batch_loss(batch, part)
                        self.accelerator.backward(loss * len(part) / len(minibatch))
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                    count += 1
                grad_norms.append(float(self.accelerator.clip_grad_norm_(self.params, s.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.eval()
        means = {key: value / max(count, 1) for key, value in totals.items()}
        means["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)  # before clipping
        return means

    # one PPO step -------------------------------------------------------------------------------------

    def step(self, rows: list[dict]) -> dict:
        """Rollout on rows, then optimise on it. Returns the step's statistics (floats)."""
        started = time.time()
        timings: dict[str, float] = {}
        kl_coef = self.kl_controller.value
        batch = self.rollout(rows, timings)
        train_started = time.time()
        loss_stats = self.train_on(batch)
        timings["training"] = timings.pop("rollout_forward") + time.time() - train_started

        mask = batch.mask
        k1, k3 = kl_estimate(batch.logprobs, batch.ref_logprobs)
        kl_per_sequence = (k1 * mask).sum(1)
        raw_advantages, _ = compute_gae(batch.rewards, batch.values, mask, self.settings.gamma, self.settings.lam)
        stats = {
            "reward_mean": batch.scores.mean(),
            "reward_std": batch.scores.std(unbiased=False),
            **{f"reward_{name}": torch.tensor([float(getattr(r, name)) for r in batch.results]).mean()
               for name in REWARD_COMPONENTS if all(hasattr(r, name) for r in batch.results)},
            "kl": kl_per_sequence.mean(),
            "kl_k3": (k3 * mask).sum(1).mean(),
            "kl_coef": kl_coef,
            "non_score_reward": (-kl_coef * kl_per_sequence).mean(),
            "rl_reward_mean": (batch.rewards * mask).sum(1).mean(),
            **loss_stats,
            "explained_variance": explained_variance(batch.values, batch.returns, mask),
            "advantage_mean": masked_mean(raw_advantages, mask),
            "advantage_std": masked_var(raw_advantages, mask).sqrt(),
            "value_mean": masked_mean(batch.values, mask),
            "return_mean": masked_mean(batch.returns, mask),
            "response_length_mean": mask.sum(1).mean(),
            "finished_fraction": batch.n_finished / len(rows),
            "time_generation_s": timings["generation"],
            "time_reward_s": timings["reward"],
            "time_training_s": timings["training"],
            "time_step_s": time.time() - started,
        }
        stats = self._across_processes(stats)
        stats.update(self._across_processes({"n_prompts": len(rows), "n_completions": len(batch.responses),
                                             "n_generated_tokens": batch.n_generated_tokens}, "sum"))
        self.kl_controller.update(stats["kl"], int(stats["n_completions"]))
        self.n_steps += 1
        return stats

    def _across_processes(self, stats: dict, reduction: str = "mean") -> dict:
        values = torch.tensor([float(v) for v in stats.values()], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction)
        out = {}
        for key, value in zip(stats, values.tolist()):
            if reduction == "sum":
                out[key] = int(value)
            else:
                out[key] = None if math.isnan(value) else round(value, 6)
        return out


def cycle_batches(rows: list[dict], batch_size: int, seed: int) -> Callable[[], list[dict]]:
    """A function returning the next batch_size rows of an endless stream: each pass over rows is a fresh
    shuffle (seeded), so every row is used once per pass."""
    rng = random.Random(seed)
    order: list[int] = []

    def next_batch() -> list[dict]:
        while len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [rows[i] for i in order[:batch_size]]
        del order[:batch_size]
        return batch

    return next_batch
