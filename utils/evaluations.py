"""Finding and loading evaluations for 11_compare_runs.py: metrics.json files from runs, folders and globs, each
with its breakdown, manifest, training logs and the training compute its checkpoint needed."""
from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from utils.files import read_json
from utils.metrics import BREAKDOWN_BOOLEANS, RATES, is_token_count
from utils.runs import STAGE_FOLDERS, StageError, read_manifest
from utils.stages import label_checkpoint, training_folders

log = logging.getLogger("finqa_rl")

# headline metrics (higher is better) and the breakdown.csv column each one is the mean of
HEADLINE = {"execution_accuracy": "exec_match", "program_accuracy": "program_match",
            "numeric_accuracy": "numeric_match", "format_compliance": "format_ok",
            "program_validity": "program_valid", "mean_reward": "reward"}
# stages whose time counts as training compute (data preparation and evaluation do not): utils/stages.py
COMPUTE_FOLDERS = training_folders()
TOKEN_KEYS = ("total_generated_tokens", "num_input_tokens_seen", "train_tokens", "total_tokens", "tokens")
COMPLETION_KEYS = ("total_completions", "n_completions")
REWARD_KEYS = ("reward", "reward_mean", "mean_reward", "rewards/mean", "train/reward", "rewards/margins")
LOSS_KEYS = ("loss", "policy_loss", "train_loss")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (JSON as Python reads it also holds NaN, Infinity and huge ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the floats
        return False


def _first(mapping: dict, keys: Iterable[str]) -> Any:
    for key in keys:
        if is_number(mapping.get(key)):
            return mapping[key]
    return None


# ----------------------------------------------------------------------------------------------------------
# finding and loading evaluations

def _expand_dir(folder: Path) -> list[Path]:
    if (folder / "metrics.json").is_file():
        return [folder / "metrics.json"]
    if (folder / STAGE_FOLDERS["evaluation"]).is_dir():
        return sorted(folder.glob(f"{STAGE_FOLDERS['evaluation']}/*/metrics.json"))
    return sorted(folder.glob(f"*/{STAGE_FOLDERS['evaluation']}/*/metrics.json"))


def find_metrics_files(inputs: Iterable[str]) -> list[Path]:
    """metrics.json files from files, run folders (or a folder of runs), evaluation folders and globs."""
    found: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            paths = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        else:
            path = Path(item)
            if not path.exists():
                raise StageError(f"input not found: {item}")
            paths = [path]
        for path in paths:
            found.extend(_expand_dir(path) if path.is_dir() else [path] if path.is_file() else [])
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def completed_metrics_files(inputs: Iterable[str]) -> list[Path]:
    """The metrics.json files a comparison reads: those whose evaluation manifest (if any) says completed."""
    files = []
    for path in find_metrics_files(inputs):
        manifest = read_manifest(path.parent)
        if manifest is not None and manifest.get("status") != "completed":
            log.warning("skipping %s: its manifest says '%s', not completed", path, manifest.get("status"))
            continue
        files.append(path)
    return files


def _locate(path_text: str | None, run_dir: Path) -> Path | None:
    """A path recorded in a manifest (relative to the cwd it ran in), found now, or re-based on run_dir."""
    if not path_text:
        return None
    path = Path(path_text)
    if path.exists():
        return path
    parts = path.parts
    if run_dir.name in parts:
        index = len(parts) - 1 - parts[::-1].index(run_dir.name)
        rebased = run_dir.joinpath(*parts[index + 1:])
        if rebased.exists():
            return rebased
    return None


def _stage_folder_of(path: Path, run_dir: Path) -> Path | None:
    """The stage folder (one with manifest.json) inside run_dir that holds path."""
    run = run_dir.resolve()
    for parent in [path, *path.parents]:
        resolved = parent.resolve()
        if resolved == run or run not in resolved.parents:
            return None
        if (parent / "manifest.json").is_file():
            return parent
    return None


def training_stage(run_dir: Path, label: str, eval_manifest: dict | None) -> Path | None:
    """The stage folder whose checkpoint an evaluation scored (from its recorded input, else from its label)."""
    record = ((eval_manifest or {}).get("inputs") or {}).get("checkpoint") or {}
    checkpoint = _locate(record.get("path"), run_dir)
    if checkpoint is not None:
        folder = _stage_folder_of(checkpoint, run_dir)
        if folder is not None:
            return folder
    trained = label_checkpoint(label)  # the stage 10 evaluates for this label by default
    if trained is not None:
        folder = run_dir / trained.folder
        if folder.is_dir():
            return folder
    return None


def upstream_compute(stage_dir: Path | None, run_dir: Path) -> tuple[float | None, list[str]]:
    """Seconds of every training stage the checkpoint needed (this one and those it read, e.g. SFT for RL)."""
    if stage_dir is None or (read_manifest(stage_dir) or {}).get("status") != "completed":
        return None, []
    total, names, seen, stack = 0.0, [], set(), [stage_dir]
    while stack:
        folder = stack.pop()
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        manifest = read_manifest(folder)
        if not manifest:
            continue
        if folder.name in COMPUTE_FOLDERS and is_number(manifest.get("duration_s")):
            total += manifest["duration_s"]
            names.append(folder.name)
        for record in (manifest.get("inputs") or {}).values():
            located = _locate(record.get("path"), run_dir)
            upstream = _stage_folder_of(located, run_dir) if located is not None else None
            if upstream is not None:
                stack.append(upstream)
    return round(total, 2), sorted(names)


@dataclass
class Evaluation:
    """One evaluation (10_evaluation/<label>) with what 11 needs from around it."""

    run: str
    run_dir: Path
    label: str
    metrics: dict
    metrics_path: Path
    breakdown_path: Path | None
    eval_manifest: dict | None
    train_dir: Path | None
    train_manifest: dict | None
    seed: int | None
    model: str | None
    method: str = ""
    breakdown: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def training_log(self) -> Path | None:
        if self.train_dir is None:
            return None
        path = self.train_dir / "logs" / "training_log.json"
        return path if path.is_file() else None

    def training_info(self) -> dict:
        manifest = self.train_manifest or {}
        metrics = manifest.get("metrics") or {}
        wall = manifest.get("duration_s") if is_number(manifest.get("duration_s")) else \
            _first(metrics, ("wall_time_s", "train_runtime_s"))
        compute, stages = upstream_compute(self.train_dir, self.run_dir)
        return {"train_stage": self.train_dir.name if self.train_dir is not None else None,
                "train_wall_time_s": wall, "train_tokens": _first(metrics, TOKEN_KEYS),
                "train_completions": _first(metrics, COMPLETION_KEYS), "train_steps": _first(metrics, ("steps",)),
                # `auto` is decided per stage: a comparison must show when methods computed in different formats
                "train_precision": (manifest.get("precision") or {}).get("dtype"),
                "compute_wall_time_s": compute if self.train_dir is not None else 0.0,
                "compute_stages": "+".join(stages)}


def _run_dir_of(metrics_path: Path) -> Path:
    if metrics_path.parent.parent.name == STAGE_FOLDERS["evaluation"]:
        return metrics_path.parent.parent.parent
    return metrics_path.parent


CSV_TRUE, CSV_FALSE = ("True", "TRUE", "true"), ("False", "FALSE", "false")  # what pandas reads as True, False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def metrics_problem(metrics: dict) -> str | None:
    """Why a metrics.json's numbers cannot be compared, or None: every rate a number in [0, 1], n_examples a
    whole number >= 1, and every other number anywhere in it finite (Python's JSON reads NaN and Infinity)."""
    for key in ("n_examples", *HEADLINE, *RATES):
        value = metrics.get(key)
        if value is not None and not is_number(value):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            return f"'{key}' is {_short(value)}, not a {'finite ' if numeric else ''}number"
    for key in RATES:
        if metrics.get(key) is not None and not 0 <= metrics[key] <= 1:
            return f"'{key}' is {metrics[key]!r}, not a rate in [0, 1]"
    count = metrics.get("n_examples")
    if count is not None and not (float(count).is_integer() and count >= 1):
        return f"'n_examples' is {count!r}, not a whole number >= 1"
    stack = [("", metrics)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{prefix}{key}.", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{prefix}{index}.", item) for index, item in enumerate(value))
        elif isinstance(value, (int, float)) and not is_number(value) and not isinstance(value, bool):
            return f"'{prefix[:-1]}' is {_short(value)}, not a finite number"
    return None


def _csv_number(cell: Any) -> Any:
    """A cell of a number column as a number where pandas would read one (a column of numbers with one text
    cell is read as text: "1.0", ..., "high")."""
    if isinstance(cell, np.generic):
        return cell.item()
    if isinstance(cell, str):
        try:
            return float(cell)
        except ValueError:
            return cell
    return cell


def checked_breakdown(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The breakdown with its True/False columns as bools and reward, n_tokens as numbers; one StageError naming
    the file, row and column where a True/False cell holds anything else (as pandas reads them), a reward is not
    a finite number, or an n_tokens is neither a token count nor empty."""
    def refuse(index: int, column: str, cell: Any, what: str):
        item = frame["id"].iloc[index] if "id" in frame else None
        row = f"row {index + 1}" + (f" (id {item!r})" if isinstance(item, str) else "")
        raise StageError(f"{path}: {row}: '{column}' is {_short(cell)}, not {what}")

    frame = frame.copy()
    for column in BREAKDOWN_BOOLEANS:
        if column in frame:
            for index, cell in enumerate(frame[column]):
                if not isinstance(cell, (bool, np.bool_)) and cell not in CSV_TRUE + CSV_FALSE:
                    refuse(index, column, cell, "True or False")
            frame[column] = frame[column].isin((True, *CSV_TRUE))
    for column, allowed, what in (("reward", is_number, "a finite number"),
                                  ("n_tokens", lambda cell: pd.isna(cell) or is_token_count(cell),
                                   "a whole number of tokens or empty")):
        if column in frame:
            for index, cell in enumerate(frame[column]):
                if not allowed(_csv_number(cell)):
                    refuse(index, column, cell, what)
            frame[column] = pd.to_numeric(frame[column])
    return frame


def load_evaluations(paths: list[Path]) -> list[Evaluation]:
    results: list[Evaluation] = []
    for path in paths:
        manifest = read_manifest(path.parent)
        metrics = read_json(path, "metrics.json")
        if not isinstance(metrics, dict) or "execution_accuracy" not in metrics:
            raise StageError(f"{path}: not an evaluation's metrics.json (no execution_accuracy)")
        problem = metrics_problem(metrics)
        if problem:
            raise StageError(f"{path}: {problem}")
        run_dir = _run_dir_of(path)
        label = str(metrics.get("label") or path.parent.name)
        train_dir = None if label == "base" else training_stage(run_dir, label, manifest)
        train_manifest = read_manifest(train_dir) if train_dir is not None else None
        seed_source = train_dir if "seed" in (train_manifest or {}) else path.parent
        seed = (train_manifest or {}).get("seed", (manifest or {}).get("seed"))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StageError(f"{seed_source / 'manifest.json'}: 'seed' is {_short(seed)}, not a whole number")
        config = (manifest or {}).get("config") or (train_manifest or {}).get("config") or {}
        breakdown = path.parent / "breakdown.csv"
        results.append(Evaluation(run_dir.name, run_dir, label, metrics, path,
                                  breakdown if breakdown.is_file() else None, manifest, train_dir, train_manifest,
                                  seed, (config.get("model") or {}).get("name")))
    # runs with the same folder name in different places keep their paths apart
    by_name: dict[str, set] = {}
    for result in results:
        by_name.setdefault(result.run, set()).add(result.run_dir.resolve())
    for result in results:
        if len(by_name[result.run]) > 1:
            result.run = str(result.run_dir)
    models = {r.model for r in results}
    for result in results:
        result.method = result.label if len(models) <= 1 else f"{result.label} ({result.model})"
    for result in results:
        if result.breakdown_path is not None:
            try:
                result.breakdown = pd.read_csv(result.breakdown_path, dtype={"id": str}, encoding="utf-8")
            except (OSError, UnicodeDecodeError, ValueError) as err:  # pandas' ParserError is a ValueError
                raise StageError(f"{result.breakdown_path}: not a readable breakdown.csv "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
            result.breakdown = checked_breakdown(result.breakdown_path, result.breakdown)
    return results
