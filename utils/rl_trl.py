"""Critic-free RL with trl (GRPO and RLOO): everything 06_train_grpo.py and 07_train_rloo.py share.

Design
------
- Policy: the SFT model with its LoRA merged in (utils.models.merged_policy_base); the trainer adds one new LoRA
  adapter (peft_config = utils.models.lora_config), the only thing that trains. With beta > 0 the reference
  policy is the same model with that adapter disabled, i.e. exactly the SFT model (trl does this for a new
  adapter), so there is no second copy of the weights.
- Reward: the project's one calculator, split into its components (utils.reward.make_reward_functions), one trl
  reward function each with reward_weights all 1.0, so trl's total is the calculator's total and every component
  is logged (rewards/reward_<component>/mean and /std). The functions get the dataset's gold columns
  (target_program, exe_ans, table) and the example id as keyword arguments.
- Budget: each optimizer step samples num_generations completions for each of prompts_per_step train prompts
  (trl's generation_batch_size = their product; one generation per step, so the update is on-policy) and
  back-propagates them micro_batch_size at a time (gradient accumulation). Both methods read the same keys, so
  their defaults spend the same budget; the manifest records it, with the tokens actually generated.
- Rollouts: the project's generation path on a merged copy of the policy (serve_rollouts, utils.models.MergedCopy)
  in place of trl's `generate` on the unmerged adapter; trl's colocated vLLM engine when algorithm.use_vllm (on a CPU
  its weight sync goes through vLLM's own reload: utils.vllm_engine).
- Scoring: trl's log-probabilities with each distinct prompt forwarded once per call and its completions on top
  of its keys and values (score_shared_prompts); the same numbers as trl's per-completion forwards.
- Validation: greedy decoding on a slice of val.jsonl (utils.validation.ValidationCallback), at step 0 (the SFT
  starting point: the new adapter is still zero) and every eval_every_steps; ckpt_<method>/best is the best of
  these by mean reward, ckpt_<method>/final the last step. Both are adapters saved with utils.models.save_adapter,
  listing the SFT adapter beneath them, so utils.models.load_model (and 10_evaluate.py) rebuilds the policy.
- Advantage estimators: RewardRecorder keeps each step's rewards exactly as the reward functions return them
  (trl passes the num_generations completions of a prompt consecutively), so the leave-one-out baseline and plain
  REINFORCE (no baseline) can be compared on the same rollouts (07 writes logs/advantage_variance.json).

trl 1.16 specifics: GRPO adds beta * KL (the k3 estimator, per token) to the loss and normalises rewards within
each group (scale_rewards); RLOO subtracts beta * KL (the k1 estimator summed over the completion) from the reward
before the leave-one-out baseline, and its loss is per sequence. The logged `kl` is the per-token mean of the
respective estimator. With num_iterations 1 the probability ratio is exactly 1, so epsilon (clipping) only acts
when num_iterations > 1.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from utils import processes, vllm_engine
from utils.cli import ConfigFlag, check_resume, setup_logging, stage_dir, stage_parser
from utils.config import ConfigError
from utils.finqa_data import hf_dataset
from utils.generation import GenerationSettings, generate, settings_from_config
from utils.models import MergedCopy, configure_torch, count_parameters, lora_config, prefix_cache, rows_cache
from utils.reward import COMPONENTS, make_reward_functions
from utils.runs import StageError, read_json, stage_run, write_json_atomic
from utils.stages import STAGES
from utils.stage_inputs import TRAIN_PROMPT_FLAG, add_policy_flags, policy_inputs, rl_train_rows
from utils.training import trainer_arguments
from utils.validation import JsonLogCallback, PolicyCheckpoints, first_logged, last_logged

log = logging.getLogger("finqa_rl")

DATASET_COLUMNS = ["prompt", "target_program", "exe_ans", "table", "id"]
COMMON_FLAGS = (
    ConfigFlag("--steps", "algorithm.steps", int, "optimizer steps (one rollout batch each)"),
    ConfigFlag("--prompts_per_step", "algorithm.prompts_per_step", int, "train prompts sampled per step"),
    ConfigFlag("--num_generations", "algorithm.num_generations", int, "completions per prompt (group size)"),
    ConfigFlag("--learning_rate", "algorithm.learning_rate", float, "AdamW learning rate on the LoRA adapter"),
    ConfigFlag("--beta", "algorithm.beta", float, "KL coefficient towards the SFT model (0: no reference)"),
    TRAIN_PROMPT_FLAG,
)
# what trl 1.16 logs every step (logging_steps 1) and training_log.json must hold
LOG_KEYS = ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "frac_reward_zero_std", "entropy",
            "completions/mean_length", "completions/clipped_ratio",
            *(f"rewards/reward_{name}/{stat}" for name in COMPONENTS for stat in ("mean", "std")))
# algorithm keys handed to trl's GRPOConfig and RLOOConfig (utils.training.algorithm_arguments)
TRL_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "beta", "epsilon",
            "num_iterations", "mask_truncated_completions", "disable_dropout", "logging_steps", "use_vllm",
            "vllm_mode", "vllm_gpu_memory_utilization", "save_every_steps", "save_total_limit")
CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # GRPO loss types that log clip_ratio/*


@dataclass(frozen=True)
class RLMethod:
    """One critic-free method: its names and what its stage adds to the shared code."""

    name: str                     # its key in utils/stages.py (folder, YAML, manifest name), ckpt_<name>/
    trainer_class: str            # trl class names
    config_class: str
    flags: tuple = ()             # named flags beyond COMMON_FLAGS
    method_keys: tuple = ()       # algorithm keys passed to the trl config unchanged
    advantage_variance: bool = False  # write logs/advantage_variance.json (LOO vs REINFORCE on the same rollouts)


# trl's private methods this module replaces or wraps on a trainer (serve_rollouts, score_shared_prompts,
# DynamicSampler, StepTimer), with the leading parameters the replacements rely on, as trl 1.16.0 has them
TRL_TESTED = "1.16.0"
TRL_PRIVATE_METHODS = {
    "_generate_single_turn": ("self", "prompt_ids"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_generate": ("self", "prompts"),
}


def check_trl_private_methods(method: RLMethod) -> None:
    """A ConfigError naming the method and trl's version where a private method this module replaces is missing or
    takes other leading parameters than trl 1.16.0's (a replacement would then compute something else); a warning
    where only the version differs."""
    import trl

    trainer_class = getattr(trl, method.trainer_class)
    for name, expected in TRL_PRIVATE_METHODS.items():
        function = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(function).parameters)[:len(expected)] if callable(function) else None
        if found != expected:
            shown = "is missing" if found is None else f"takes ({', '.join(found)}, ...)"
            raise ConfigError(f"trl {trl.__version__}: {method.trainer_class}.{name} {shown}; this stage replaces it "
                              f"and is written against trl {TRL_TESTED}, where it takes ({', '.join(expected)}, ...): "
                              f"install trl=={TRL_TESTED} (requirements.txt)")
    if trl.__version__ != TRL_TESTED:
        log.warning("trl %s: this stage replaces private methods of %s written against trl %s (their parameters "
                    "match)", trl.__version__, method.trainer_class, TRL_TESTED)


# ----------------------------------------------------------------------------------------------------------
# advantage estimators (on the rewards of one step, grouped by prompt)

def _grouped(rewards, group_size: int) -> np.ndarray:
    values = np.asarray(rewards, dtype=float).reshape(-1)
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    if values.size % group_size:
        raise ValueError(f"{values.size} rewards do not split into groups of {group_size}")
    return values.reshape(-1, group_size)


def leave_one_out_advantages(rewards, group_size: int) -> np.ndarray:
    """RLOO: each completion's reward minus the mean reward of the other completions of its prompt.

    rewards: flat, the group_size completions of a prompt consecutive (trl's order). Each group's advantages sum
    to zero, and equal group_size / (group_size - 1) * (reward - group mean)."""
    grouped = _grouped(rewards, group_size)
    baseline = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def reinforce_advantages(rewards) -> np.ndarray:
    """Plain REINFORCE: the reward itself, no baseline."""
    return np.asarray(rewards, dtype=float).reshape(-1).copy()


def estimator_stats(advantages) -> dict:
    """The spread of an estimator's per-completion weights on one step's rollouts.

    variance: around their mean; mean_square: E[A^2], which is what scales the policy-gradient estimator's variance
    (sum_i A_i * grad log p_i): a constant offset in the rewards adds nothing to the variance of the weights but
    makes the gradient estimate noisier, which is the point of a baseline."""
    values = np.asarray(advantages, dtype=float)
    return {"mean": float(values.mean()), "variance": float(values.var()), "mean_square": float((values ** 2).mean())}


def advantage_variance(rewards, group_size: int) -> dict:
    return {"loo": estimator_stats(leave_one_out_advantages(rewards, group_size)),
            "reinforce": estimator_stats(reinforce_advantages(rewards))}


def summarize_advantage_variance(steps: list[dict]) -> dict:
    """Means over the steps, and how often the leave-one-out weights were the less spread ones."""
    if not steps:
        return {"n_steps": 0}
    summary: dict = {"n_steps": len(steps)}
    for stat in ("variance", "mean_square"):
        loo = float(np.mean([s["loo"][stat] for s in steps]))
        plain = float(np.mean([s["reinforce"][stat] for s in steps]))
        summary[f"loo_mean_{stat}"] = loo
        summary[f"reinforce_mean_{stat}"] = plain
        summary[f"{stat}_ratio_loo_over_reinforce"] = loo / plain if plain > 0 else None
        summary[f"steps_loo_lower_{stat}"] = sum(s["loo"][stat] < s["reinforce"][stat] for s in steps)
    return summary


# ----------------------------------------------------------------------------------------------------------
# reward functions

class RewardRecorder:
    """Wraps trl reward functions that trl calls one after another on the same batch (the reward components) and
    records, per batch, the total reward of each completion in trl's order, grouped by prompt, with the example
    ids (to check the grouping) and the number of generated tokens. Names are kept, so trl logs them as before."""

    def __init__(self, functions: list, group_size: int):
        self.group_size = group_size
        self.batches: list[dict] = []
        self._parts: list[list[float]] = []
        self.functions = [self._wrap(function) for function in functions]

    def _wrap(self, function):
        @functools.wraps(function)
        def recorded(completions, **kwargs):
            values = function(completions, **kwargs)
            self._parts.append(list(values))
            if len(self._parts) == len(self.functions):
                self._record(kwargs)
            return values

        return recorded

    def _record(self, kwargs: dict) -> None:
        totals = [float(sum(parts)) for parts in zip(*self._parts, strict=True)]
        self._parts = []
        k = self.group_size
        ids = list(kwargs.get("id") or [])
        state = kwargs.get("trainer_state")
        self.batches.append({
            "step": state.global_step + 1 if state is not None else len(self.batches) + 1,
            "rewards": [totals[i: i + k] for i in range(0, len(totals), k)],
            "ids": ids[::k],
            "grouped_by_prompt": bool(ids) and all(len(set(ids[i: i + k])) == 1 for i in range(0, len(ids), k)),
            "n_completions": len(totals),
            "n_generated_tokens": sum(len(ids_) for ids_ in kwargs.get("completion_ids") or []),
        })

    def gather(self) -> None:
        """Under several processes: every process's records of a step merged into one (on every process)."""
        if not processes.several():
            return
        merged: dict[int, dict] = {}
        for batch in processes.gather_list(self.batches):
            step = merged.setdefault(batch["step"], {"step": batch["step"], "rewards": [], "ids": [],
                                                     "grouped_by_prompt": True, "n_completions": 0,
                                                     "n_generated_tokens": 0})
            step["rewards"] += batch["rewards"]
            step["ids"] += batch["ids"]
            step["grouped_by_prompt"] &= batch["grouped_by_prompt"]
            step["n_completions"] += batch["n_completions"]
            step["n_generated_tokens"] += batch["n_generated_tokens"]
        self.batches = [merged[step] for step in sorted(merged)]

    @property
    def total_completions(self) -> int:
        return sum(batch["n_completions"] for batch in self.batches)

    @property
    def total_generated_tokens(self) -> int:
        return sum(batch["n_generated_tokens"] for batch in self.batches)

    def zero_variance_groups(self) -> dict:
        """How many groups scored the same for every completion (no gradient from the task reward), per step and
        over the run. trl's frac_reward_zero_std is this for GRPO; RLOO's is on the KL-adjusted reward."""
        per_step = [float(np.mean([np.ptp(group) == 0 for group in batch["rewards"]])) for batch in self.batches]
        return {"fraction": float(np.mean(per_step)) if per_step else None,
                "steps_with_no_varied_group": sum(fraction == 1.0 for fraction in per_step), "per_step": per_step}

    def advantage_variance(self) -> dict:
        """Both estimators on each recorded step's rollouts (logs/advantage_variance.json)."""
        steps = [{"step": batch["step"], "n_groups": len(batch["rewards"]), "rewards": batch["rewards"],
                  "grouped_by_prompt": batch["grouped_by_prompt"],
                  **advantage_variance(batch["rewards"], self.group_size)} for batch in self.batches]
        return {
            "group_size": self.group_size,
            "definition": "per step, on the same rollouts: loo = reward - mean reward of the other completions of "
                          "the prompt (RLOO); reinforce = reward (no baseline). variance is around the mean of the "
                          "step's weights, mean_square is E[A^2] (it scales the policy-gradient variance). Rewards "
                          "are the calculator's totals as the reward functions returned them (trl's RLOO also "
                          "subtracts beta * KL before its baseline; that part is not in these figures).",
            "summary": summarize_advantage_variance(steps),
            "steps": steps,
        }


class StepTimer(TrainerCallback):
    """Seconds per optimizer step split into generation (trl's _generate), reward (the reward functions) and
    training (the rest: log-probabilities, loss, backward, optimizer), added to each step's log record under the
    same keys as PPO's (time_generation_s, time_reward_s, time_training_s, time_step_s), and the part of training
    spent in no-grad scoring passes (the reference model's, RLOO's old policy's: time_scoring_s). It must come
    before the validation callback, so a step's time leaves validation out."""

    def __init__(self):
        self.parts = {"generation": 0.0, "reward": 0.0, "scoring": 0.0}
        self.started = 0.0
        self.finished_step: dict | None = None
        self.steps: list[dict] = []

    def timed(self, function, part: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - started

        return wrapper

    def timed_scoring(self, function):
        """function (trl's log-probability pass), its calls without grad timed as scoring."""
        import torch

        timed = self.timed(function, "scoring")

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return (function if torch.is_grad_enabled() else timed)(*args, **kwargs)

        return wrapper

    def on_step_begin(self, args, state, control, **kwargs):
        self.parts = {"generation": 0.0, "reward": 0.0, "scoring": 0.0}
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self.started
        self.finished_step = {"time_generation_s": self.parts["generation"], "time_reward_s": self.parts["reward"],
                              "time_training_s": total - self.parts["generation"] - self.parts["reward"],
                              "time_scoring_s": self.parts["scoring"], "time_step_s": total}
        self.steps.append(self.finished_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.finished_step is not None:
            logs.update(self.finished_step)
            if state.log_history:
                state.log_history[-1].update(self.finished_step)
            self.finished_step = None

    def totals(self) -> dict:
        return {part: round(sum(step[f"time_{part}_s"] for step in self.steps), 1)
                for part in ("generation", "reward", "training", "scoring", "step")}


# ----------------------------------------------------------------------------------------------------------
# configuration -> trl arguments

def rollout_budget(config: dict) -> dict:
    """What one run spends, from the algorithm config (generation settings fill the nulls)."""
    algo, gen = config["algorithm"], config["generation"]
    prompts, group = algo["prompts_per_step"], algo["num_generations"]  # ranges: utils.config.RULES
    return {
        "steps": algo["steps"], "prompts_per_step": prompts, "num_generations": group,
        "completions_per_step": prompts * group, "total_completions": algo["steps"] * prompts * group,
        "max_completion_length": algo["max_completion_length"] or gen["max_new_tokens"],
        "temperature": gen["temperature"] if algo["temperature"] is None else algo["temperature"],
        "top_p": gen["top_p"] if algo["top_p"] is None else algo["top_p"],
    }


def rollout_settings(config: dict, budget: dict) -> GenerationSettings:
    """Sampling as trl's GRPOConfig / RLOOConfig get it from the budget (top_k off); rows end at end-of-turn."""
    return settings_from_config(config, sampled=True, max_new_tokens=budget["max_completion_length"],
                                temperature=budget["temperature"], top_p=budget["top_p"], stop_at_json_end=False)


def micro_batch_size(config: dict, completions_per_step: int) -> int:
    """Completions per forward/backward pass: algorithm.micro_batch_size (null: training.batch_size), lowered to
    the nearest divisor of the completions per step."""
    wanted = config["algorithm"]["micro_batch_size"] or config["training"]["batch_size"]
    size = max(d for d in range(1, min(wanted, completions_per_step) + 1) if completions_per_step % d == 0)
    if size != wanted:
        log.warning("micro batch %d does not divide %d completions per step: using %d", wanted,
                    completions_per_step, size)
    return size


def trl_arguments(method: RLMethod, config: dict, out_dir: Path, seed: int, device) -> dict:
    """Keyword arguments for trl's GRPOConfig / RLOOConfig."""
    import trl

    budget = rollout_budget(config)
    per_process = budget["completions_per_step"] // processes.world_size()  # the budget is global
    if per_process * processes.world_size() != budget["completions_per_step"]:
        raise ConfigError(f"algorithm.prompts_per_step x num_generations = {budget['completions_per_step']} "
                          f"completions per step do not split over {processes.world_size()} processes")
    micro = micro_batch_size(config, per_process)
    return trainer_arguments(
        config, out_dir, seed, device, getattr(trl, method.config_class),
        algorithm_keys=TRL_KEYS + method.method_keys,
        output_dir=str(out_dir / f"ckpt_{method.name}" / "checkpoints"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_process // micro,  # one generation batch per step, over all processes
        num_generations=budget["num_generations"],
        max_steps=budget["steps"],
        max_completion_length=budget["max_completion_length"],
        temperature=budget["temperature"],
        top_p=budget["top_p"],
        top_k=0,
        save_strategy="steps",  # trainer checkpoints every save_every_steps, for --resume
    )


def serve_rollouts(trainer, policy_copy: MergedCopy, tokenizer, settings: GenerationSettings) -> None:
    """Serve trl's rollouts from the project's generation path (utils.generation) on a merged copy of the policy.

    trl's own path (`generate` on the unmerged adapter) spends most of a decode step of a few rows on the adapter's
    extra matmuls (and, on float32 weights under autocast, on casting every weight). The seam is
    `_generate_single_turn`, where trl's vLLM path plugs in too: it gets the prompts' token ids (chat template
    applied) and returns the completions' ids. trl repeats each prompt num_generations times in a row; such a run is
    prefilled once and sampled num_generations times. Rows stop at end-of-turn / EOS only (not at the end of the
    JSON), as trl's own do, the stop token kept."""
    returns_logprobs = "num_generations" in inspect.signature(trainer._generate_single_turn).parameters  # GRPO

    def generate_single_turn(prompt_ids, *args, **kwargs):
        prompts = [list(ids) for ids in prompt_ids]
        runs = [len(list(group)) for _, group in itertools.groupby(prompts)]
        k = runs[0] if len(set(runs)) == 1 else 1
        groups = generate(policy_copy.model(trainer.state.global_step), tokenizer, prompts[::k],
                          dataclasses.replace(settings, num_return_sequences=k), show_progress=False)
        completion_ids = [generation.token_ids for group in groups for generation in group]
        return (completion_ids, None) if returns_logprobs else completion_ids

    trainer._generate_single_turn = generate_single_turn


def prompt_groups(prompt_ids, prompt_mask) -> list[list[int]]:
    """Row indices grouped by identical prompt (token ids and attention mask), in order of first appearance."""
    import torch

    groups: dict[bytes, list[int]] = {}
    for row, key in enumerate(torch.cat([prompt_ids, prompt_mask], dim=1).cpu().numpy()):
        groups.setdefault(key.tobytes(), []).append(row)
    return list(groups.values())


def score_shared_prompts(trainer) -> None:
    """Forward each distinct prompt once when trl scores completions (`_get_per_token_logps_and_entropies`: the
    reference pass, RLOO's pass for the KL in its reward, and the training pass).

    trl forwards every completion with its own copy of the prompt, and a GRPO/RLOO batch holds num_generations
    completions of each prompt, the prompt ~90% of each sequence here. In a causal model the prompt's positions do
    not depend on what follows, so this runs each distinct prompt once (all but its last token, whose output
    predicts the first completion token), keeps its keys and values, and forwards the completions on top of them
    through trl's own fused LM head (temperature, entropy): the same log-probabilities and entropies and, with
    grad, the same gradients (the prompt's activations get the sum of its completions' gradients; nothing here is
    random: the project's LoRA dropout is 0, and a model with dropout would share its prompt's mask across the
    group). Each forward holds at most as many tokens as trl's own chunk of `batch_size` sequences. trl's own path
    runs where this would not be the same computation or would save nothing: gradient checkpointing in training
    mode (the layers drop the cache), a training pass through DistributedDataParallel (it allows one forward per
    backward), the MoE aux loss, multimodal inputs, or no prompt that repeats."""
    import torch

    original = trainer._get_per_token_logps_and_entropies

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                      compute_entropy=False, compute_aux_loss=False, **inputs):
        cut = input_ids.shape[1] - logits_to_keep - 1
        groups = prompt_groups(input_ids[:, :cut + 1], attention_mask[:, :cut + 1])
        unwrapped = trainer.accelerator.unwrap_model(model)
        checkpointing = unwrapped.training and any(getattr(m, "gradient_checkpointing", False)
                                                   for m in unwrapped.modules())
        ddp_training = torch.is_grad_enabled() and model is not unwrapped
        if (cut < 1 or len(groups) == len(input_ids) or compute_aux_loss or checkpointing or ddp_training
                or any(value is not None for value in inputs.values())):
            return original(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                            compute_aux_loss, **inputs)
        rows_per_forward = max(1, (batch_size or len(input_ids)) * input_ids.shape[1] // (logits_to_keep + 1))
        order, logps, entropies = [], [], []
        for rows in groups:
            with trainer.accelerator.autocast():
                prompt = prefix_cache(model, input_ids[rows[:1], :cut], attention_mask[rows[:1], :cut])
            for start in range(0, len(rows), rows_per_forward):
                chunk = rows[start: start + rows_per_forward]
                cache = rows_cache(prompt, len(chunk))
                suffix, mask = input_ids[chunk, cut:], attention_mask[chunk]
                labels = suffix.masked_fill(mask[:, cut:] == 0, -100)  # the head scores labels[:, 1:]
                with trainer.accelerator.autocast():
                    out = model(input_ids=suffix, attention_mask=mask, past_key_values=cache, labels=labels,
                                fused_lm_head=True)
                order += chunk
                logps.append(out.log_probs[:, -logits_to_keep:])
                if compute_entropy:
                    entropies.append(out.entropy[:, -logits_to_keep:])
        back = torch.argsort(torch.tensor(order, device=input_ids.device))  # trl's row order
        return (torch.cat(logps)[back], torch.cat(entropies)[back] if compute_entropy else None, None)

    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies


def make_trainer(method: RLMethod, model, tokenizer, train_dataset, reward_funcs: list, arguments: dict,
                 callbacks: list = (), peft_config=None):
    import trl

    config_class, trainer_class = getattr(trl, method.config_class), getattr(trl, method.trainer_class)
    arguments = {**arguments, "reward_weights": [1.0] * len(reward_funcs)}  # the components add up to the total
    return trainer_class(model=model, reward_funcs=reward_funcs, args=config_class(**arguments),
                         train_dataset=train_dataset, processing_class=tokenizer, callbacks=list(callbacks),
                         peft_config=peft_config)


def expected_log_keys(algo: dict) -> list[str]:
    keys = list(LOG_KEYS)
    if algo["beta"] > 0:
        keys.append("kl")
    if algo.get("loss_type") is None or algo["loss_type"] in CLIPPED_LOSSES:
        keys.append("clip_ratio/region_mean")
    return keys


# ----------------------------------------------------------------------------------------------------------
# dynamic sampling (DAPO): trl has none

def _pad_to(tensor, width: int, left: bool, value):
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), value)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def replace_rows(batch: dict, donor: dict, rows: list[int], donor_rows: list[int], pad_id: int) -> dict:
    """batch with its `rows` taken from donor's `donor_rows`: two outputs of trl's _generate_and_score_completions
    (tensors with the batch first; prompts padded on the left, completions and their per-token values on the
    right, to the wider of the two)."""
    out = dict(batch)
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        other = donor[key]
        if value.dim() >= 2:
            left = key.startswith("prompt")
            fill = pad_id if key.endswith("_ids") else 0
            width = max(value.shape[1], other.shape[1])
            value, other = _pad_to(value, width, left, fill), _pad_to(other, width, left, fill)
        value = value.clone()
        value[rows] = other[donor_rows].to(value.dtype)
        out[key] = value
    return out


class DynamicSampler(TrainerCallback):
    """DAPO's dynamic sampling on trl's GRPO / RLOO (algorithm.dynamic_sampling): a group whose completions all got
    the same reward gives no gradient, so after trl scores a step's rollouts, each such group is replaced by a group
    of a fresh prompt (drawn at random from the train set, seeded by step) that has reward variance, generated and
    scored by trl's own code; at most max_extra_groups groups are drawn beyond the step's, and a group still all-equal
    when they are spent is masked out of the loss (its completion_mask zeroed), so no step trains on one. Counts per
    step (groups drawn, kept, dropped, masked) go to the training log and the manifest. One process only."""

    def __init__(self, recorder: "RewardRecorder", group_size: int, max_extra_groups: int, seed: int, pad_id: int):
        self.recorder, self.k, self.max_extra, self.seed, self.pad_id = recorder, group_size, max_extra_groups, seed, \
            pad_id
        self.steps: list[dict] = []
        self.trained: list[list[tuple[list[float], bool]]] = []  # per step, each group's rewards and if it is masked
        self._pending: dict | None = None

    def install(self, trainer) -> None:
        """Put the sampler around trainer's scoring of each step's rollouts (it draws fresh prompts from its train
        set). As a callback it must come before JsonLogCallback, so its counts reach the step's log record."""
        self.trainer, self.dataset = trainer, trainer.train_dataset
        self.score = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = self._generate_and_score

    def _all_equal_groups(self) -> list[int]:
        batch = self.recorder.batches[-1]  # the call just made (one process: its rows, grouped by prompt)
        if not batch["grouped_by_prompt"]:
            raise StageError("dynamic sampling: trl's batch does not hold each prompt's completions together")
        return [index for index, group in enumerate(batch["rewards"]) if np.ptp(group) == 0]

    def _generate_and_score(self, inputs):
        output = self.score(inputs)
        groups = list(self.recorder.batches[-1]["rewards"])
        bad = self._all_equal_groups()
        n_groups = len(inputs) // self.k
        counts = {"groups_drawn": n_groups, "groups_dropped": len(bad), "groups_masked": 0}
        step = self.trainer.state.global_step
        rng = random.Random(self.seed + 1_000_003 * step)
        drawn_extra = 0
        while bad and drawn_extra < self.max_extra:
            n = min(len(bad), self.max_extra - drawn_extra)
            fresh = [self.dataset[rng.randrange(len(self.dataset))] for _ in range(n)]
            donor = self.score([row for row in fresh for _ in range(self.k)])
            drawn_extra += n
            still_equal = set(self._all_equal_groups())
            varied = [g for g in range(n) if g not in still_equal]
            counts["groups_dropped"] += n - len(varied)
            for group in varied:
                target = bad.pop(0)
                groups[target] = self.recorder.batches[-1]["rewards"][group]
                output = replace_rows(output, donor, list(range(target * self.k, (target + 1) * self.k)),
                                      list(range(group * self.k, (group + 1) * self.k)), self.pad_id)
        if bad:  # the cap is spent: these groups stay in the batch's shape but out of the loss
            rows = [row for group in bad for row in range(group * self.k, (group + 1) * self.k)]
            output["completion_mask"] = output["completion_mask"].clone()
            output["completion_mask"][rows] = 0
            counts["groups_masked"] = len(bad)
        if "num_items_in_batch" in output:  # the tokens the loss is normalised by
            output["num_items_in_batch"] = output["completion_mask"].sum()
        counts["groups_drawn"] += drawn_extra
        counts["groups_kept"] = n_groups - len(bad)
        self.trained.append([(rewards, index in bad) for index, rewards in enumerate(groups)])
        self._pending = {"step": step + 1, **counts}
        self.steps.append(self._pending)
        return output

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending is not None:
            entry = {f"dynamic/{key}": value for key, value in self._pending.items() if key != "step"}
            logs.update(entry)
            if state.log_history:
                state.log_history[-1].update(entry)
            self._pending = None

    def summary(self) -> dict:
        totals = {key: sum(s[key] for s in self.steps) for key in
                  ("groups_drawn", "groups_kept", "groups_dropped", "groups_masked")}
        return {**totals, "max_extra_groups_per_step": self.max_extra, "per_step": self.steps}


class ResumeState(TrainerCallback):
    """What a resumed run needs beyond trl's checkpoint (adapter, optimizer, scheduler, RNG, trainer state): each
    step's recorded rewards (RewardRecorder) and times (StepTimer), written beside every trainer checkpoint, one
    file per process, and read back by restore()."""

    def __init__(self, recorder: RewardRecorder, timer: StepTimer):
        self.recorder, self.timer = recorder, timer
        self.dynamic: DynamicSampler | None = None  # its per-step counts too, where it runs

    @staticmethod
    def path(checkpoint: Path) -> Path:
        return Path(checkpoint) / f"finqa_rl_state_{processes.rank()}.json"

    def on_save(self, args, state, control, **kwargs):
        write_json_atomic(self.path(Path(args.output_dir) / f"checkpoint-{state.global_step}"),
                          {"step": state.global_step, "reward_batches": self.recorder.batches,
                           "step_times": self.timer.steps,
                           "dynamic_sampling": self.dynamic.steps if self.dynamic is not None else None})

    def restore(self, checkpoint: Path) -> None:
        """Load the state saved with `checkpoint`."""
        path = self.path(checkpoint)
        data = read_json(path, "resume state")
        if not (isinstance(data, dict) and isinstance(data.get("step"), int) and
                isinstance(data.get("reward_batches"), list) and isinstance(data.get("step_times"), list)):
            raise StageError(f"{path}: not this project's resume state; re-run without --resume")
        self.recorder.batches, self.timer.steps = data["reward_batches"], data["step_times"]
        if self.dynamic is not None:
            self.dynamic.steps = list(data.get("dynamic_sampling") or [])


# ----------------------------------------------------------------------------------------------------------
# the stage

def require_vllm_if_asked(algo: dict) -> None:
    """algorithm.use_vllm where vLLM cannot run is an error, never a silent fall-back to generate."""
    if not algo["use_vllm"]:
        return
    if algo["vllm_mode"] == "server":  # trl would wait its 240 s for a server nobody started
        raise ConfigError("algorithm.vllm_mode: server needs a `trl vllm-serve` process, and this project does not "
                          "start one or pass its host and port; use algorithm.vllm_mode=colocate")
    vllm_engine.require("algorithm.use_vllm")


def stage_parser_for(method: RLMethod, description: str):
    """The command line of 06 / 07: every stage's flags, the policy's, the rollout budget's and the method's."""
    parser = stage_parser(description, STAGES[method.name], config_flags=COMMON_FLAGS + tuple(method.flags))
    add_policy_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last trainer "
                                                              "checkpoint (every algorithm.save_every_steps)")
    return parser


def run_stage(method: RLMethod, args, config: dict) -> int:
    """Train; save ckpt_<method>/{best,final}, logs, val_generations and the manifest."""
    stage = STAGES[method.name]
    algo = config["algorithm"]
    budget = rollout_budget(config)
    out_dir = stage_dir(args, config, stage.key)
    check_resume(args, out_dir)
    setup_logging()
    device = configure_torch(config)
    require_vllm_if_asked(algo)
    check_trl_private_methods(method)
    if algo["dynamic_sampling"] and processes.several():
        raise ConfigError("algorithm.dynamic_sampling: runs on one process (each process holds only its share of "
                          "a step's groups); run the stage without a launcher or set algorithm.dynamic_sampling=false")
    batch_wide = {"scale_rewards": "batch", "normalize_advantages": True}  # advantages scaled over the whole step
    clash = [key for key, value in batch_wide.items() if algo.get(key) == value]
    if algo["dynamic_sampling"] and clash:
        raise ConfigError(f"algorithm.dynamic_sampling with algorithm.{clash[0]}={algo[clash[0]]}: a replacement group "
                          f"would be scaled by the statistics of the call that drew it, not of the step it joins; "
                          f"scale per group (GRPO's scale_rewards group or none, RLOO's normalize_advantages false)")

    with stage_run(stage.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=args.resume) as run:
        started = time.time()
        train_rows = rl_train_rows(args, config, run)
        policy = policy_inputs(args, config, run, device, method.name.upper())
        tokenizer = policy.tokenizer
        checkpoints = PolicyCheckpoints(out_dir, method.name, tokenizer, policy.adapters)
        arguments = trl_arguments(method, config, out_dir, args.seed, device)
        resume_from = checkpoints.resume_point(args.resume)  # (trl writes them there: arguments' output_dir)
        validation = checkpoints.validation(policy.val_rows, policy.calculator,
                                            settings_from_config(config, sampled=False), algo["eval_every_steps"],
                                            args.seed, resume_from=resume_from)
        recorder = RewardRecorder(make_reward_functions(policy.calculator), budget["num_generations"])
        timer = StepTimer()
        resume_state = ResumeState(recorder, timer)
        if algo["dynamic_sampling"]:
            resume_state.dynamic = DynamicSampler(recorder, budget["num_generations"],
                                                  algo["dynamic_sampling_max_extra_groups"], args.seed,
                                                  tokenizer.pad_token_id)
        if args.resume:
            log.info("resuming from %s", resume_from or "the start (no trainer checkpoint yet)")
        if algo["use_vllm"]:
            vllm_engine.prepare_trl_colocate(device, next(policy.base.parameters()).dtype)
        trainer = make_trainer(method, policy.base, tokenizer, hf_dataset(train_rows, DATASET_COLUMNS),
                               [timer.timed(function, "reward") for function in recorder.functions], arguments,
                               [timer, *([resume_state.dynamic] if resume_state.dynamic else []),
                                JsonLogCallback(checkpoints.log_path), validation, resume_state], lora_config(config))
        if resume_state.dynamic:
            resume_state.dynamic.install(trainer)
        if resume_from:
            resume_state.restore(resume_from)
        policy_copy = MergedCopy(trainer.accelerator.unwrap_model(trainer.model))
        validation.generation_model = policy_copy.model
        if algo["use_vllm"]:  # trl's colocated vLLM engine generates the rollouts
            if device.type == "cpu":
                vllm_engine.sync_trl_weights_on_cpu(trainer)
        else:
            serve_rollouts(trainer, policy_copy, tokenizer, rollout_settings(config, budget))
        score_shared_prompts(trainer)
        trainer._generate = timer.timed(trainer._generate, "generation")
        trainer._get_per_token_logps_and_entropies = timer.timed_scoring(trainer._get_per_token_logps_and_entropies)

        if not resume_from:
            validation.run(trainer.model, 0)  # the SFT starting point: the new adapter is still zero
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        recorder.gather()  # several processes: each scored its share of every step's completions
        if not processes.is_main():
            return 0

        figures = checkpoints.finish(run, trainer.model, validation)

        history, val = trainer.state.log_history, validation.history
        logged = sorted({key for record in history for key in record})
        missing = [key for key in expected_log_keys(algo) if key not in logged]
        if missing:
            log.warning("training_log.json lacks %s (trl did not log them)", ", ".join(missing))
        if not all(batch["grouped_by_prompt"] for batch in recorder.batches):
            log.warning("a reward batch did not hold each prompt's completions consecutively")
        actual = {"total_completions": recorder.total_completions,
                  "total_generated_tokens": recorder.total_generated_tokens}
        run.metrics.update({
            **{key: budget[key] for key in ("steps", "prompts_per_step", "num_generations", "completions_per_step")},
            **actual,
            "budget": {**budget, **actual, "mean_completion_tokens":
                       actual["total_generated_tokens"] / max(actual["total_completions"], 1)},
            "beta": algo["beta"], "learning_rate": algo["learning_rate"],
            **{key: algo[key] for key in method.method_keys},
            **figures,
            "first_train_reward": first_logged(history, "reward"), "final_train_reward": last_logged(history, "reward"),
            "final_kl": last_logged(history, "kl"), "final_entropy": last_logged(history, "entropy"),
            "final_frac_reward_zero_std": last_logged(history, "frac_reward_zero_std"),
            "groups_with_zero_reward_variance": recorder.zero_variance_groups(),
            **({"dynamic_sampling": resume_state.dynamic.summary()} if resume_state.dynamic else {}),
            "train_prompts": algo["train_prompts"], "train_examples": len(train_rows),
            "processes": processes.world_size(),
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "seconds": timer.totals(),
            "wall_time_s": round(time.time() - started, 1),
            "parameters": count_parameters(trainer.model),
            "logged_keys": logged, "missing_log_keys": missing,
        })
        if method.advantage_variance:
            report = recorder.advantage_variance()
            write_json_atomic(run.add_output("advantage_variance", out_dir / "logs" / "advantage_variance.json"),
                              report)
            run.metrics["advantage_variance"] = report["summary"]
        log.info("%s done: %d steps, %d completions (%d tokens), val reward %.3f -> %.3f, final kl %s",
                 method.name.upper(), trainer.state.global_step, actual["total_completions"],
                 actual["total_generated_tokens"], val[0]["mean_reward"], val[-1]["mean_reward"],
                 run.metrics["final_kl"])
    return 0
