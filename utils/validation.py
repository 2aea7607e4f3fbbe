"""Validation during training: generate on a slice of val.jsonl, score with the reward calculator, keep the best.

One routine for every training stage: SFT writes valid_samples/step_N.json, the RL and DPO stages write
val_generations/step_N.json, all with the same fields (parse rate, program validity, execution accuracy,
mean reward, and each sample).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from utils.generation import GenerationSettings, generate
from utils.reward import RewardCalculator
from utils.runs import write_json_atomic

log = logging.getLogger("finqa_rl")


def score_generations(rows: list[dict], completions: list[str], calculator: RewardCalculator) -> tuple[dict, list]:
    """Headline figures and per-sample records for completions of rows (same order)."""
    samples = []
    for row, completion in zip(rows, completions):
        result = calculator.score_example(completion, row)
        samples.append({"id": row["id"], "completion": completion, "reward": result.total,
                        "failure_reason": result.failure_reason, "format_ok": result.format_ok,
                        "program_valid": result.program_valid, "exec_match": result.exec_match,
                        "executed_value": result.executed_value, "exe_ans": row["exe_ans"]})
    n = max(len(samples), 1)
    summary = {
        "n_examples": len(samples),
        "parse_rate": sum(s["format_ok"] for s in samples) / n,
        "program_validity": sum(s["program_valid"] for s in samples) / n,
        "execution_accuracy": sum(s["exec_match"] for s in samples) / n,
        "mean_reward": sum(s["reward"] for s in samples) / n,
    }
    return summary, samples


def validate(model, tokenizer, rows: list[dict], calculator: RewardCalculator, settings: GenerationSettings,
             seed: int = 0) -> tuple[dict, list]:
    generations = generate(model, tokenizer, [row["prompt"] for row in rows], settings, desc="validating",
                           seed=seed)
    completions = [group[0].text for group in generations]
    summary, samples = score_generations(rows, completions, calculator)
    summary["mean_completion_tokens"] = sum(g[0].n_tokens for g in generations) / max(len(generations), 1)
    return summary, samples


class ValidationCallback(TrainerCallback):
    """Every `every` optimizer steps (and at the end): validate, write <folder>/step_N.json, and call
    on_best(model, summary) when the mean reward beats the best so far."""

    def __init__(self, tokenizer, rows: list[dict], calculator: RewardCalculator, settings: GenerationSettings,
                 folder: Path, every: int, seed: int, on_best: Callable | None = None, best_reward: float | None = None):
        self.tokenizer, self.rows, self.calculator, self.settings = tokenizer, rows, calculator, settings
        self.folder, self.every, self.seed, self.on_best = Path(folder), every, seed, on_best
        self.best_reward = best_reward
        self.history: list[dict] = []
        self._last_step = -1

    def run(self, model, step: int) -> dict:
        summary, samples = validate(model, self.tokenizer, self.rows, self.calculator, self.settings, self.seed)
        summary["step"] = step
        write_json_atomic(self.folder / f"step_{step}.json", {"summary": summary, "samples": samples})
        self.history.append(summary)
        log.info("validation at step %d: parse rate %.2f, exec acc %.2f, mean reward %.3f", step,
                 summary["parse_rate"], summary["execution_accuracy"], summary["mean_reward"])
        if self.best_reward is None or summary["mean_reward"] > self.best_reward:
            self.best_reward = summary["mean_reward"]
            if self.on_best is not None:
                self.on_best(model, summary)
        self._last_step = step
        return summary

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self.run(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._last_step:
            self.run(model, state.global_step)


class JsonLogCallback(TrainerCallback):
    """Mirrors the trainer's logs into logs/training_log.json as they come (rewritten atomically), so the
    curves survive an interruption."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.records.append({"step": state.global_step, "epoch": state.epoch, **logs})
            write_json_atomic(self.path, self.records)
