"""Comparing evaluations across methods, seeds and runs (11_compare_runs.py): finding metrics files, the summary
table, paired tests against the baseline on the same test items, report.md, and the diff of two runs."""
from __future__ import annotations

import glob
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from utils.config import apply_overrides, config_diff, flatten
from utils.runs import STAGE_FOLDERS, StageError, read_manifest
from utils.stages import label_checkpoint, training_folders
from utils.stats import as_bool, bootstrap_ci, mcnemar_exact, paired_bootstrap

log = logging.getLogger("finqa_rl")

DEFAULT_INPUT = "outputs/run_*/10_evaluation/*/metrics.json"
COMPARISON_DEFAULTS = {"baseline": "sft", "n_bootstrap": 2000, "confidence": 0.95}
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
ENVIRONMENT_KEYS = ("python", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "device",
                    "git_commit", "platform")


# ----------------------------------------------------------------------------------------------------------
# configuration and small helpers

def comparison_config(inputs: Iterable[str], overrides: Iterable[str] = (), named: dict | None = None) -> dict:
    """The resolved configuration of 11_compare_runs.py (what its manifest records; the driver computes it too)."""
    config = apply_overrides({"inputs": [str(i) for i in inputs], **COMPARISON_DEFAULTS}, overrides, named)
    if int(config["n_bootstrap"]) < 1:
        raise StageError(f"n_bootstrap must be at least 1, got {config['n_bootstrap']}")
    if not 0.0 < float(config["confidence"]) < 1.0:
        raise StageError(f"confidence must be between 0 and 1, got {config['confidence']}")
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def _first(mapping: dict, keys: Iterable[str]) -> Any:
    for key in keys:
        if _is_number(mapping.get(key)):
            return mapping[key]
    return None


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _compact(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def fmt_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


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
        if folder.name in COMPUTE_FOLDERS and _is_number(manifest.get("duration_s")):
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
        wall = manifest.get("duration_s") if _is_number(manifest.get("duration_s")) else \
            _first(metrics, ("wall_time_s", "train_runtime_s"))
        compute, stages = upstream_compute(self.train_dir, self.run_dir)
        return {"train_stage": self.train_dir.name if self.train_dir is not None else None,
                "train_wall_time_s": wall, "train_tokens": _first(metrics, TOKEN_KEYS),
                "train_completions": _first(metrics, COMPLETION_KEYS), "train_steps": _first(metrics, ("steps",)),
                "compute_wall_time_s": compute if self.train_dir is not None else 0.0,
                "compute_stages": "+".join(stages)}


def _run_dir_of(metrics_path: Path) -> Path:
    if metrics_path.parent.parent.name == STAGE_FOLDERS["evaluation"]:
        return metrics_path.parent.parent.parent
    return metrics_path.parent


def load_evaluations(paths: list[Path]) -> list[Evaluation]:
    results: list[Evaluation] = []
    for path in paths:
        manifest = read_manifest(path.parent)
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise StageError(f"{path}: not a readable metrics.json ({str(err).splitlines()[0]})") from None
        if not isinstance(metrics, dict) or "execution_accuracy" not in metrics:
            raise StageError(f"{path}: not an evaluation's metrics.json (no execution_accuracy)")
        for key in ("n_examples", *HEADLINE):
            if key in metrics and metrics[key] is not None and not _is_number(metrics[key]):
                raise StageError(f"{path}: '{key}' is {metrics[key]!r}, not a number")
        run_dir = _run_dir_of(path)
        label = str(metrics.get("label") or path.parent.name)
        train_dir = None if label == "base" else training_stage(run_dir, label, manifest)
        train_manifest = read_manifest(train_dir) if train_dir is not None else None
        seed = (train_manifest or {}).get("seed", (manifest or {}).get("seed"))
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
    return results


# ----------------------------------------------------------------------------------------------------------
# tables and tests

def bootstrap_all(results: list[Evaluation], config: dict, seed: int) -> dict[tuple[str, str], dict]:
    """(run, label) -> metric -> bootstrap CI from breakdown.csv (where the item column exists)."""
    cis: dict[tuple[str, str], dict] = {}
    for result in results:
        entry = {}
        frame = result.breakdown
        for metric, column in HEADLINE.items():
            if frame is not None and column in frame.columns and len(frame):
                column_values = frame[column].dropna()
                values = column_values.astype(float) if column == "reward" else as_bool(column_values)
                entry[metric] = bootstrap_ci(values, int(config["n_bootstrap"]), float(config["confidence"]), seed)
        cis[(result.run, result.label)] = entry
    return cis


def summary_frame(results: list[Evaluation], cis: dict) -> pd.DataFrame:
    """One row per evaluation: identity, every metric of metrics.json (nested keys dotted), training compute."""
    rows = []
    for result in results:
        row: dict[str, Any] = {"run": result.run, "method": result.method, "label": result.label,
                               "seed": result.seed, "model": result.model}
        for key, value in flatten(result.metrics).items():
            if key not in row and not isinstance(value, (list, dict)):
                row[key] = value
        row.update(result.training_info())
        ci = cis.get((result.run, result.label), {}).get("execution_accuracy")
        row["execution_accuracy_ci_low"] = ci["low"] if ci else None
        row["execution_accuracy_ci_high"] = ci["high"] if ci else None
        row["metrics_path"] = str(result.metrics_path)
        rows.append(row)
    return pd.DataFrame(rows)


def group_stats(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per method: runs, seeds, mean and std over runs (std needs two or more runs)."""
    rows = []
    for method, frame in summary.groupby("method", sort=False):
        values = pd.to_numeric(frame[metric], errors="coerce").dropna() if metric in frame else pd.Series([], dtype=float)
        seeds = sorted({int(s) for s in frame["seed"].dropna()}) if "seed" in frame else []
        rows.append({"method": method, "n_runs": int(values.size), "seeds": seeds,
                     "mean": float(values.mean()) if values.size else float("nan"),
                     "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                     "per_run": {run: float(v) for run, v in zip(frame["run"], pd.to_numeric(frame[metric], errors="coerce"))
                                 if not math.isnan(v)} if metric in frame else {}})
    return pd.DataFrame(rows)


def paired_tests(results: list[Evaluation], config: dict, seed: int) -> tuple[list[dict], list[str]]:
    """Each method against the baseline of the same run, on the test items both have (joined on id)."""
    baseline, tests, notes = config["baseline"], [], []
    by_run: dict[str, dict[str, Evaluation]] = {}
    for result in results:
        by_run.setdefault(result.run, {})[result.label] = result
    for result in results:
        if result.train_dir is not None and (result.train_manifest or {}).get("status") != "completed":
            notes.append(f"{result.run}/{result.label}: its training stage {result.train_dir.name} is not completed "
                         f"now (re-running?), so its compute is unknown")
    for run, labels in by_run.items():
        base = labels.get(baseline)
        others = [r for label, r in labels.items() if label != baseline]
        if base is None:
            if others:
                notes.append(f"{run}: no '{baseline}' evaluation, so no paired tests")
            continue
        if base.breakdown is None:
            notes.append(f"{run}: {baseline} has no breakdown.csv, so no paired tests")
            continue
        for other in others:
            if other.breakdown is None:
                notes.append(f"{run}/{other.label}: no breakdown.csv, so no paired test")
                continue
            left = base.breakdown[["id", "exec_match"]].drop_duplicates("id")
            right = other.breakdown[["id", "exec_match"]].drop_duplicates("id")
            joined = left.merge(right, on="id", suffixes=("_base", "_method"))
            if joined.empty:
                notes.append(f"{run}/{other.label}: no test item in common with {baseline}, so no paired test")
                continue
            if len(joined) < max(len(left), len(right)):
                notes.append(f"{run}/{other.label}: {len(joined)} items in common with {baseline} "
                             f"({len(right)} vs {len(left)} evaluated)")
            base_ok, method_ok = as_bool(joined["exec_match_base"]), as_bool(joined["exec_match_method"])
            mcnemar = mcnemar_exact(base_ok, method_ok)
            boot = paired_bootstrap(base_ok, method_ok, int(config["n_bootstrap"]), float(config["confidence"]), seed)
            tests.append({"run": run, "method": other.method, "label": other.label, "baseline": baseline,
                          "n_items": len(joined), "accuracy": boot["method"][0],
                          "accuracy_ci": boot["method"][1:], "baseline_accuracy": boot["baseline"][0],
                          "baseline_ci": boot["baseline"][1:], "diff": boot["diff"][0], "diff_ci": boot["diff"][1:],
                          **{k: mcnemar[k] for k in ("b", "c", "n_discordant", "p_value")}})
    return tests, notes


def best_per_metric(summary: pd.DataFrame) -> list[dict]:
    best = []
    for metric in HEADLINE:
        if metric not in summary:
            continue
        stats = group_stats(summary, metric).dropna(subset=["mean"]).sort_values("mean", ascending=False)
        if len(stats):
            top = stats.iloc[0]
            tied = [m for m, v in zip(stats["method"], stats["mean"]) if v == top["mean"]]
            best.append({"metric": metric, "best": ", ".join(tied), "mean": float(top["mean"]),
                         "runner_up": stats.iloc[len(tied)]["method"] if len(stats) > len(tied) else None})
    return best


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def report_markdown(summary: pd.DataFrame, results: list[Evaluation], cis: dict, tests: list[dict],
                    notes: list[str], config: dict, seed: int, plots: dict[str, str]) -> str:
    conf = int(round(float(config["confidence"]) * 100))
    runs = sorted(summary["run"].unique())
    out = ["# FinQA-RL: method comparison", "",
           f"{len(summary)} evaluation(s) from {len(runs)} run(s): {', '.join(runs)}. "
           f"Paired tests against **{config['baseline']}** of the same run; bootstrap: "
           f"{config['n_bootstrap']} resamples of the test items, seed {seed}, {conf}% percentile intervals.", ""]

    methods = list(dict.fromkeys(summary["method"]))
    overview = []
    for method in methods:
        frame = summary[summary["method"] == method]
        row = [method, str(len(frame))]
        for metric in HEADLINE:
            values = pd.to_numeric(frame.get(metric), errors="coerce").dropna() if metric in frame else []
            row.append(fmt(float(np.mean(values))) if len(values) else "–")
        overview.append(row)
    out += ["## Overview (mean over runs)", "", _table(["method", "runs", *HEADLINE], overview), ""]

    out += ["## Best method per metric", "",
            _table(["metric", "best", "mean", "runner-up"],
                   [[b["metric"], b["best"], b["mean"], b["runner_up"] or "–"] for b in best_per_metric(summary)]),
            ""]

    for metric in HEADLINE:
        if metric not in summary:
            continue
        rows = []
        for _, stat in group_stats(summary, metric).iterrows():
            if stat["n_runs"] == 1:
                run = next(iter(stat["per_run"]))
                ci = cis.get((run, summary[(summary["method"] == stat["method"]) & (summary["run"] == run)]
                              ["label"].iloc[0]), {}).get(metric)
                spread = f"{conf}% CI [{fmt(ci['low'])}, {fmt(ci['high'])}] (bootstrap)" if ci else "–"
            else:
                same_seed = "; seeds not all different" if len(stat["seeds"]) < stat["n_runs"] else ""
                spread = f"± {fmt(stat['std'])} (std over {stat['n_runs']} runs{same_seed})"
            rows.append([stat["method"], str(stat["n_runs"]), ", ".join(map(str, stat["seeds"])) or "–",
                         fmt(stat["mean"]), spread,
                         ", ".join(f"{run}: {fmt(v)}" for run, v in stat["per_run"].items())])
        out += [f"## {metric}", "", _table(["method", "runs", "seeds", "mean", "spread", "per run"], rows), ""]

    out += [f"## Paired comparison against {config['baseline']} (execution match, same test items)", "",
            f"b = items the method answers correctly and {config['baseline']} does not; c = the reverse. "
            "Exact McNemar test: two-sided binomial test of b successes in b + c trials with p = 1/2 "
            "(scipy.stats.binomtest). Differences are method − baseline with paired bootstrap intervals.", ""]
    if tests:
        out.append(_table(["run", "method", "items", "exec acc", f"{conf}% CI", f"{config['baseline']}",
                           "diff", f"diff {conf}% CI", "b", "c", "p-value"],
                          [[t["run"], t["method"], str(t["n_items"]), t["accuracy"],
                            f"[{fmt(t['accuracy_ci'][0])}, {fmt(t['accuracy_ci'][1])}]", t["baseline_accuracy"],
                            f"{t['diff']:+.4f}", f"[{fmt(t['diff_ci'][0])}, {fmt(t['diff_ci'][1])}]",
                            str(t["b"]), str(t["c"]), fmt_p(t["p_value"])] for t in tests]))
    else:
        out.append("No paired test could be made.")
    out += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])

    rows = []
    for result in results:
        ci = cis.get((result.run, result.label), {}).get("execution_accuracy")
        rows.append([result.run, result.method, fmt(result.metrics.get("execution_accuracy")),
                     f"[{fmt(ci['low'])}, {fmt(ci['high'])}]" if ci else "–", str(ci["n"]) if ci else "–"])
    out += [f"## Execution accuracy with bootstrap {conf}% CIs", "",
            _table(["run", "method", "exec acc", f"{conf}% CI", "items"], rows), ""]

    compute_rows = [[row["run"], row["method"], row.get("train_stage") or "–", row.get("train_wall_time_s"),
                     row.get("train_tokens"), row.get("train_completions"), row.get("compute_wall_time_s"),
                     row.get("compute_stages") or "–"] for row in summary.to_dict("records")]
    out += ["## Training compute", "",
            "Wall time of the stage that trained the checkpoint; tokens and completions where its manifest logs them; "
            "compute = every training stage the checkpoint needed (e.g. SFT + GRPO).", "",
            _table(["run", "method", "stage", "wall s", "tokens", "completions", "compute s", "compute stages"],
                   [[cell if isinstance(cell, str) else (_compact(cell) if _is_number(cell) else "–")
                     for cell in row] for row in compute_rows]), ""]

    out += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# curves for the plots

def training_curves(results: list[Evaluation]) -> list[dict]:
    """The reward (and loss) per step of each evaluated method's training log."""
    curves, seen = [], set()
    for result in results:
        path = result.training_log
        if path is None or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable training log, left out of the plots", path)
            continue
        records = [r for r in records if isinstance(r, dict) and _is_number(r.get("step"))]
        curve = {"name": f"{result.run}/{result.label}", "method": result.method}
        for kind, keys in (("reward", REWARD_KEYS), ("loss", LOSS_KEYS)):
            key = next((k for k in keys if any(_is_number(r.get(k)) for r in records)), None)
            if key is None and kind == "reward":
                key = next((k for r in records for k in r if "reward" in k and _is_number(r.get(k))), None)
            if key is not None:
                points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
                curve[kind] = {"key": key, "steps": [p[0] for p in points], "values": [p[1] for p in points]}
        if "reward" in curve or "loss" in curve:
            curves.append(curve)
    return curves


# ----------------------------------------------------------------------------------------------------------
# the diff of two runs

def _stage_manifests(run_dir: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(run_dir.glob("*/manifest.json")) + sorted(run_dir.glob("*/*/manifest.json")):
        manifest = read_manifest(path.parent)
        if manifest is not None:
            found[str(path.parent.relative_to(run_dir))] = manifest
    return found


def _evaluation_metrics(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(run_dir.glob(f"{STAGE_FOLDERS['evaluation']}/*/metrics.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def resolve_run(name: str, outputs_root: str | Path = "outputs") -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    candidate = Path(outputs_root) / name
    if candidate.is_dir():
        return candidate
    raise StageError(f"--diff: no run folder '{name}' (looked for {path} and {candidate})")


def diff_runs(run_a: Path, run_b: Path) -> dict:
    """Structured differences: per stage config keys, inputs' sha256, environment; metric deltas per label."""
    a, b = _stage_manifests(run_a), _stage_manifests(run_b)
    stages = {}
    for stage in sorted(set(a) | set(b)):
        if stage not in a or stage not in b:
            stages[stage] = {"only_in": str(run_a if stage in a else run_b)}
            continue
        ma, mb = a[stage], b[stage]
        entry: dict[str, Any] = {}
        config = config_diff(ma.get("config"), mb.get("config"))
        if config:
            entry["config"] = config
        if ma.get("seed") != mb.get("seed"):
            entry["seed"] = f"{ma.get('seed')} -> {mb.get('seed')}"
        if ma.get("status") != mb.get("status"):
            entry["status"] = f"{ma.get('status')} -> {mb.get('status')}"
        ins_a, ins_b = ma.get("inputs") or {}, mb.get("inputs") or {}
        inputs = []
        for name in sorted(set(ins_a) | set(ins_b)):
            sha_a, sha_b = (ins_a.get(name) or {}).get("sha256"), (ins_b.get(name) or {}).get("sha256")
            if sha_a != sha_b:
                inputs.append(f"{name}: {(sha_a or '(absent)')[:12]} -> {(sha_b or '(absent)')[:12]} "
                              f"({(ins_b.get(name) or ins_a.get(name))['path']})")
        if inputs:
            entry["inputs"] = inputs
        env_a, env_b = ma.get("environment") or {}, mb.get("environment") or {}
        environment = [f"{k}: {env_a.get(k)} -> {env_b.get(k)}" for k in ENVIRONMENT_KEYS if env_a.get(k) != env_b.get(k)]
        if environment:
            entry["environment"] = environment
        if entry:
            stages[stage] = entry
    metrics_a, metrics_b = _evaluation_metrics(run_a), _evaluation_metrics(run_b)
    deltas = {}
    for label in sorted(set(metrics_a) & set(metrics_b)):
        fa, fb = flatten(metrics_a[label]), flatten(metrics_b[label])
        changes = {key: {"a": fa[key], "b": fb[key], "delta": fb[key] - fa[key]}
                   for key in fa if key in fb and _is_number(fa[key]) and _is_number(fb[key]) and fa[key] != fb[key]}
        deltas[label] = changes
    only = sorted(set(metrics_a) ^ set(metrics_b))
    return {"a": str(run_a), "b": str(run_b), "stages": stages, "metric_deltas": deltas, "labels_in_one_run": only}


def format_diff(diff: dict) -> str:
    lines = [f"diff {diff['a']} -> {diff['b']}"]
    if not diff["stages"]:
        lines.append("stages: no differences in configuration, seeds, inputs or environment")
    for stage, entry in diff["stages"].items():
        lines.append(f"== {stage}")
        if "only_in" in entry:
            lines.append(f"  only in {entry['only_in']}")
            continue
        for kind in ("status", "seed"):
            if kind in entry:
                lines.append(f"  {kind:<7} {entry[kind]}")
        for kind, label in (("config", "config"), ("inputs", "input"), ("environment", "env")):
            lines += [f"  {label:<7} {line}" for line in entry.get(kind, [])]
    lines.append("== metrics (10_evaluation, b - a)")
    for label, changes in diff["metric_deltas"].items():
        if not changes:
            lines.append(f"  {label}: identical")
        for key, change in changes.items():
            lines.append(f"  {label:<8} {key}: {fmt(change['a'])} -> {fmt(change['b'])} ({change['delta']:+.4g})")
    for label in diff["labels_in_one_run"]:
        lines.append(f"  {label}: evaluated in one run only")
    return "\n".join(lines)
