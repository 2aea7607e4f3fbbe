"""Plots for the comparison report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def metrics_by_method(bars: dict[str, list[dict]], path: Path) -> Path:
    """bars: metric -> [{"method", "value", "low", "high", "kind"}] where low/high are the error bar's ends
    (mean ± std over seeds, or a single run's bootstrap CI)."""
    metrics = list(bars)
    cols = min(3, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        entries = bars[metric]
        if not entries:
            _empty(ax, "no data")
            continue
        x = range(len(entries))
        values = [e["value"] for e in entries]
        lower = [max(e["value"] - e["low"], 0.0) if e["low"] is not None else 0.0 for e in entries]
        upper = [max(e["high"] - e["value"], 0.0) if e["high"] is not None else 0.0 for e in entries]
        ax.bar(x, values, yerr=[lower, upper], capsize=4, color="#4C72B0", alpha=0.85)
        ax.set_xticks(list(x))
        ax.set_xticklabels([e["method"] for e in entries], rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("metrics by method (error bars: std over seeds, or bootstrap CI for a single run)", fontsize=9)
    return _save(fig, path)


CURVE_TITLES = {"reward": "training reward", "loss": "training loss", "kl": "KL to the SFT model",
                "zero_variance": "groups with zero reward variance"}


def training_curves(curves: list[dict], path: Path) -> Path:
    """One panel per kind (reward, loss, KL, zero-variance groups), per step, from each method's training."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (kind, title) in zip(axes.flat, CURVE_TITLES.items()):
        drawn = [c for c in curves if kind in c]
        for curve in drawn:
            data = curve[kind]
            ax.plot(data["steps"], data["values"], marker="." if len(data["steps"]) < 30 else None,
                    label=f"{curve['name']} ({data['key']})")
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel("fraction of groups" if kind == "zero_variance" else kind)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            _empty(ax, f"no {kind} in any training log")
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def accuracy_vs_compute(points: list[dict], path: Path) -> Path:
    """points: {"name", "accuracy", "seconds", "completions"}; one panel per compute measure."""
    panels = [("seconds", "training compute (s, incl. upstream training stages)")]
    if any(p.get("completions") is not None for p in points):
        panels.append(("completions", "sampled completions during training"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, xlabel) in zip(axes.flat, panels):
        usable = [p for p in points if p.get(key) is not None]
        if not usable:
            _empty(ax, f"no {key} recorded")
            continue
        ax.scatter([p[key] for p in usable], [p["accuracy"] for p in usable], color="#DD8452")
        for p in usable:
            ax.annotate(p["name"], (p[key], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("execution accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy against compute", fontsize=10)
    return _save(fig, path)
