"""Validation during training: generate on a slice of val.jsonl, score with the reward calculator, keep the best.

One routine for every training stage: SFT writes valid_samples/step_N.json, the RL and DPO stages write
val_generations/step_N.json, all with the same fields (parse rate, program validity, execution accuracy,
mean reward, and each sample). PolicyCheckpoints is the part of a training stage (03, 05, 06, 07, 09) that is the
same in each: its best/final checkpoints, its validation and the validation figures of its manifest.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from utils import processes
from utils.generation import GenerationSettings, generate
from utils.models import save_adapter
from utils.reward import RewardCalculator
from utils.runs import StageError, read_json, write_json_atomic
from utils.training import checkpoint_step, last_checkpoint

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
    on_best(model, summary) when the mean reward beats the best so far. `generation_model(step)`, when set, gives
    the model to generate with in place of the trained one (a method stage's utils.models.MergedCopy.model)."""

    def __init__(self, tokenizer, rows: list[dict], calculator: RewardCalculator, settings: GenerationSettings,
                 folder: Path, every: int, seed: int, on_best: Callable | None = None, best_reward: float | None = None):
        self.tokenizer, self.rows, self.calculator, self.settings = tokenizer, rows, calculator, settings
        self.folder, self.every, self.seed, self.on_best = Path(folder), every, seed, on_best
        self.best_reward = best_reward
        self.history: list[dict] = []
        self._last_step = -1
        self.generation_model: Callable | None = None

    def restore(self, upto_step: int) -> None:
        """A resumed run's history: the validations an interrupted run wrote up to the trainer checkpoint it
        resumes from (later ones are redone)."""
        summaries = []
        for path in self.folder.glob("step_*.json"):
            record = read_json(path, "validation")
            summary = record.get("summary") if isinstance(record, dict) else None
            if not isinstance(summary, dict) or not isinstance(summary.get("step"), int):
                raise StageError(f"{path}: not a validation record (a summary with its step); remove the "
                                 f"interrupted run's folder or re-run without --resume")
            if summary["step"] <= upto_step:
                summaries.append(summary)
        self.history = sorted(summaries, key=lambda summary: summary["step"])
        if self.history and self.history[-1]["step"] == upto_step:
            self._last_step = upto_step

    def run(self, model, step: int) -> dict | None:
        """Validate on the main process (the others wait for it; they return None)."""
        summary = self._run(model, step) if processes.is_main() else None
        processes.wait_for_everyone()
        self._last_step = step
        return summary

    def _run(self, model, step: int) -> dict:
        generator = self.generation_model(step) if self.generation_model else model
        summary, samples = validate(generator, self.tokenizer, self.rows, self.calculator, self.settings, self.seed)
        summary["step"] = step
        write_json_atomic(self.folder / f"step_{step}.json", {"summary": summary, "samples": samples})
        self.history.append(summary)
        log.info("validation at step %d: parse rate %.2f, exec acc %.2f, mean reward %.3f", step,
                 summary["parse_rate"], summary["execution_accuracy"], summary["mean_reward"])
        if self.best_reward is None or summary["mean_reward"] > self.best_reward:
            self.best_reward = summary["mean_reward"]
            if self.on_best is not None:
                self.on_best(model, summary)
        return summary

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self.run(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._last_step:
            self.run(model, state.global_step)


class PolicyCheckpoints:
    """What every training stage (03, 05, 06, 07, 09) writes the same way: ckpt_<key>/best (the best validation so
    far; for a method stage the SFT start included), ckpt_<key>/final, each with its val_summary.json, validation
    every `every` steps into <val_folder>/ (SFT's is valid_samples/, the methods' val_generations/), and the
    manifest's outputs and validation figures. `save_extra(model, dest)` adds a stage's own files to each checkpoint
    (PPO's value head)."""

    def __init__(self, out_dir: Path, key: str, tokenizer, adapters: list, save_extra: Callable | None = None,
                 val_folder: str = "val_generations"):
        self.out_dir, self.tokenizer, self.adapters, self.save_extra = Path(out_dir), tokenizer, adapters, save_extra
        self.ckpt_dir = self.out_dir / f"ckpt_{key}"
        self.trainer_dir = self.ckpt_dir / "checkpoints"  # resumable checkpoints (checkpoint-<step>)
        self.val_dir = self.out_dir / val_folder
        self.log_path = self.out_dir / "logs" / "training_log.json"

    def save(self, model, name: str, summary: dict | None) -> None:
        dest = self.ckpt_dir / name
        save_adapter(model, self.tokenizer, dest, adapters=self.adapters)
        if self.save_extra is not None:
            self.save_extra(model, dest)
        if summary is not None:
            write_json_atomic(dest / "val_summary.json", summary)

    def best_reward_saved(self) -> float | None:
        """The mean reward of the best checkpoint an interrupted run saved (so a resumed run keeps it unless beaten)."""
        summary = self.ckpt_dir / "best" / "val_summary.json"
        if not summary.is_file():
            return None
        data = read_json(summary, "validation summary")
        reward = data.get("mean_reward") if isinstance(data, dict) else None
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise StageError(f"{summary}: no finite 'mean_reward' (remove the interrupted run's checkpoint or "
                             f"re-run without resuming)")
        return reward

    def resume_point(self, resume: bool) -> Path | None:
        """The checkpoint a --resume run continues from: the newest in trainer_dir (None: start over)."""
        return last_checkpoint(self.trainer_dir) if resume else None

    def validation(self, rows: list[dict], calculator: RewardCalculator, settings: GenerationSettings, every: int,
                   seed: int, best_reward: float | None = None,
                   resume_from: Path | None = None) -> ValidationCallback:
        """The stage's validation callback; resuming from a checkpoint, with the best and the validations the
        interrupted run had up to it."""
        callback = ValidationCallback(self.tokenizer, rows, calculator, settings, self.val_dir, every, seed,
                                      on_best=lambda model, summary: self.save(model, "best", summary),
                                      best_reward=self.best_reward_saved() if resume_from else best_reward)
        if resume_from:
            callback.restore(checkpoint_step(resume_from))
        return callback

    def finish(self, run, model, validation: ValidationCallback | None) -> dict:
        """Save ckpt_<key>/final (and best, when nothing was validated), record the outputs, and return the
        manifest's validation figures ({} without validation). The main process's job (utils.processes)."""
        self.save(model, "final", validation.history[-1] if validation else None)
        if validation is None:
            self.save(model, "best", None)
        trainer_dir = self.ckpt_dir / "checkpoints"  # a trl trainer's output_dir, empty with save_strategy "no"
        if trainer_dir.is_dir() and not any(trainer_dir.iterdir()):
            trainer_dir.rmdir()
        for name, path in (("ckpt_final", self.ckpt_dir / "final"), ("ckpt_best", self.ckpt_dir / "best"),
                           ("training_log", self.log_path), (self.val_dir.name, self.val_dir)):
            run.add_output(name, path)
        return validation_figures(validation.history) if validation else {}


def validation_figures(history: list[dict]) -> dict:
    """The start (step 0: the SFT model), end and best of a stage's validation history, for its manifest."""
    first, last = history[0], history[-1]
    best = max(history, key=lambda summary: summary["mean_reward"])
    return {
        "initial_val_reward": first["mean_reward"], "final_val_reward": last["mean_reward"],
        "initial_val_parse_rate": first["parse_rate"], "final_val_parse_rate": last["parse_rate"],
        "initial_val_execution_accuracy": first["execution_accuracy"],
        "final_val_execution_accuracy": last["execution_accuracy"],
        "best_val_reward": best["mean_reward"], "best_step": best["step"],
        "validation": history,
    }


def first_logged(history: list[dict], key: str):
    """The first value a trainer logged under key (None values skipped), or None."""
    return next((record[key] for record in history if record.get(key) is not None), None)


def last_logged(history: list[dict], key: str):
    """The last value a trainer logged under key (None values skipped), or None."""
    return first_logged(history[::-1], key)


def logged_upto(records: list, step: int) -> list:
    """A training log's records of the steps up to `step` (a resumed run redoes and logs the later ones)."""
    return [record for record in records if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                                                 and record["step"] > step)]


class JsonLogCallback(TrainerCallback):
    """Mirrors the trainer's logs into logs/training_log.json as they come (rewritten atomically), so the
    curves survive an interruption."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = read_json(self.path, "training log") if self.path.is_file() else []
        if not isinstance(self.records, list):
            raise StageError(f"{self.path}: not a training log (a JSON list of records)")

    def on_train_begin(self, args, state, control, **kwargs):
        # resuming from a trainer checkpoint at state.global_step: the steps after it are redone and logged again
        self.records = logged_upto(self.records, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and processes.is_main():
            self.records.append({"step": state.global_step, "epoch": state.epoch, **logs})
            write_json_atomic(self.path, self.records)
