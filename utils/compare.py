"""Comparing evaluations across methods, seeds and runs (11_compare_runs.py): its configuration, the summary
table, paired tests against the baseline on the same test items, report.md and the training curves. Finding and
loading the evaluations: utils/evaluations.py; the diff of two runs: utils/run_diff.py."""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from utils.config import apply_overrides, flatten
from utils.files import read_json
from utils.runs import StageError
from utils.evaluations import HEADLINE, LOSS_KEYS, REWARD_KEYS, Evaluation, is_number
from utils.stats import MDE_ALPHA, MDE_POWER, as_bool, bootstrap_ci, mcnemar_exact, mcnemar_mde, paired_bootstrap

log = logging.getLogger("finqa_rl")

DEFAULT_INPUT = "outputs/run_*/10_evaluation/*/metrics.json"
COMPARISON_DEFAULTS = {"baseline": "sft", "n_bootstrap": 2000, "confidence": 0.95}


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
                          **{k: mcnemar[k] for k in ("b", "c", "n_discordant", "p_value")},
                          "mde": mcnemar_mde(len(joined), mcnemar["n_discordant"])})
    return tests, notes


def reading(test: dict) -> str:
    """What a paired test says, in words that never call a difference it could not see 'no effect'."""
    if test["p_value"] < MDE_ALPHA:
        return f"differs (p < {MDE_ALPHA:g})"
    if test["mde"] is None:
        return "not detected; at this discordance no difference is detectable"
    return f"not detected; this test sees >= {100 * test['mde']:.1f} points"


def split_mde(tests: list[dict]) -> dict | None:
    """The split's minimum detectable effect: its item count and the pairs' median discordance (None: no test)."""
    if not tests:
        return None
    n = int(np.median([t["n_items"] for t in tests]))
    share = float(np.median([t["n_discordant"] / t["n_items"] for t in tests]))
    return {"n_items": n, "discordance": share, "mde": mcnemar_mde(n, round(share * n))}


def with_paired_tests(summary: pd.DataFrame, tests: list[dict]) -> pd.DataFrame:
    """summary.csv's rows with their paired test against the baseline (difference, p-value, MDE) where one ran."""
    columns = {"diff_vs_baseline": "diff", "p_vs_baseline": "p_value", "mde_vs_baseline": "mde"}
    found = {(t["run"], t["label"]): t for t in tests}
    summary = summary.copy()
    for column, key in columns.items():
        summary[column] = [found[(run, label)][key] if (run, label) in found else None
                           for run, label in zip(summary["run"], summary["label"])]
    return summary


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
            "(scipy.stats.binomtest). Differences are method − baseline with paired bootstrap intervals. "
            f"MDE: the smallest difference the test detects at α = {MDE_ALPHA:g} with {MDE_POWER:.0%} power on these "
            "items at their observed share of discordant items (b + c) / items (Connor 1987, "
            "utils/stats.mcnemar_mde); a difference not detected is never read as no effect, only as smaller than "
            "what the test could see.", ""]
    if tests:
        out.append(_table(["run", "method", "items", "exec acc", f"{conf}% CI", f"{config['baseline']}",
                           "diff", f"diff {conf}% CI", "b", "c", "p-value", "MDE", "reading"],
                          [[t["run"], t["method"], str(t["n_items"]), t["accuracy"],
                            f"[{fmt(t['accuracy_ci'][0])}, {fmt(t['accuracy_ci'][1])}]", t["baseline_accuracy"],
                            f"{t['diff']:+.4f}", f"[{fmt(t['diff_ci'][0])}, {fmt(t['diff_ci'][1])}]",
                            str(t["b"]), str(t["c"]), fmt_p(t["p_value"]),
                            "–" if t["mde"] is None else f"{t['mde']:.4f}", reading(t)] for t in tests]))
        split = split_mde(tests)
        if split["mde"] is not None:
            out += ["", f"At this split's size ({split['n_items']} items) and the pairs' median discordance "
                        f"({split['discordance']:.3f}), these tests detect differences of {split['mde']:.4f} "
                        f"({100 * split['mde']:.1f} points) or more with {MDE_POWER:.0%} power."]
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
                     row.get("train_precision") or "–", row.get("train_tokens"), row.get("train_completions"),
                     row.get("compute_wall_time_s"), row.get("compute_stages") or "–"]
                    for row in summary.to_dict("records")]
    out += ["## Training compute", "",
            "Wall time of the stage that trained the checkpoint and the number format it computed in; tokens and "
            "completions where its manifest logs them; compute = every training stage the checkpoint needed (e.g. "
            "SFT + GRPO).", "",
            _table(["run", "method", "stage", "wall s", "precision", "tokens", "completions", "compute s",
                    "compute stages"],
                   [[cell if isinstance(cell, str) else (_compact(cell) if is_number(cell) else "–")
                     for cell in row] for row in compute_rows]), ""]

    out += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# curves for the plots

CURVE_KINDS = ("reward", "loss", "kl", "zero_variance")  # utils.plots.training_curves draws one panel each


def training_curves(results: list[Evaluation]) -> list[dict]:
    """Per step of each evaluated method's training: reward, loss and KL from its training log, and the fraction
    of prompt groups whose completions all got the same task reward (no gradient from it) from its manifest
    (GRPO/RLOO: groups_with_zero_reward_variance, on the calculator's reward before any KL term)."""
    curves, seen = [], set()
    for result in results:
        path = result.training_log
        if path is None or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            records = read_json(path, "training log")
        except StageError as err:
            log.warning("%s, left out of the plots", err)
            continue
        if not isinstance(records, list):
            log.warning("%s: a training log is a list of records, left out of the plots", path)
            continue
        records = [r for r in records if isinstance(r, dict) and is_number(r.get("step"))]
        curve = {"name": f"{result.run}/{result.label}", "method": result.method}
        for kind, keys in (("reward", REWARD_KEYS), ("loss", LOSS_KEYS), ("kl", ("kl",))):
            key = next((k for k in keys if any(is_number(r.get(k)) for r in records)), None)
            if key is None and kind == "reward":
                key = next((k for r in records for k in r if "reward" in k and is_number(r.get(k))), None)
            if key is not None:
                points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
                curve[kind] = {"key": key, "steps": [p[0] for p in points], "values": [p[1] for p in points]}
        zero = ((result.train_manifest or {}).get("metrics") or {}).get("groups_with_zero_reward_variance")
        per_step = zero.get("per_step") if isinstance(zero, dict) else None
        if isinstance(per_step, list) and per_step and all(is_number(value) for value in per_step):
            curve["zero_variance"] = {"key": "groups_with_zero_reward_variance", "values": per_step,
                                      "steps": list(range(1, len(per_step) + 1))}
        if any(kind in curve for kind in CURVE_KINDS):
            curves.append(curve)
    return curves
