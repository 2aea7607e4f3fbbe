"""The diff of two runs (11_compare_runs.py --diff): what changed in each stage's configuration, seed and
environment, and in each evaluation's metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.compare import fmt
from utils.config import config_diff, flatten
from utils.evaluations import is_number
from utils.runs import STAGE_FOLDERS, StageError, read_json, read_manifest

ENVIRONMENT_KEYS = ("python", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "device",
                    "git_commit", "platform")


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
            out[path.parent.name] = read_json(path, "metrics")
        except StageError:
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
                   for key in fa if key in fb and is_number(fa[key]) and is_number(fb[key]) and fa[key] != fb[key]}
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
