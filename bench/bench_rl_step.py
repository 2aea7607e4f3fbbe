"""Benchmark: seconds per RL step (generation / reward / training) for PPO, GRPO and RLOO, float32 against bf16.

Each method runs as its own stage (05, 06, 07) from the same SFT checkpoint with its --quick_test budget (the
three spend the same: 4 completions of at most 48 tokens per step) and --steps N, once with model.dtype float32
and once with bfloat16, one after the other in turn; the figures are the mean over steps 2..N of each stage's
logs/training_log.json (time_generation_s, time_reward_s, time_training_s; the first step carries warm-up costs).
Runs go to outputs/bench_rl/<dtype>/<method> (replaced on the next run of this script).

    python bench/bench_rl_step.py --policy_ckpt outputs/run_001/03_sft/ckpt_sft/best --steps 4

--before_repo DIR also runs each method, first, with another checkout's stage scripts (e.g. `git worktree add
/tmp/before <commit>`) in float32: the path before a change, on the same machine in the same run. --vllm also runs
GRPO and RLOO with their rollouts on trl's colocated vLLM engine (algorithm.use_vllm) in each --dtypes.
--variant NAME=KEY=VALUE[,KEY=VALUE...] (repeatable) also runs each method in each --dtypes with those overrides on
top, after the plain run, and records its speed-up over it. Every run records seconds per completion (a step's
seconds over its completions) and, for GRPO/RLOO, the no-grad scoring passes inside training (time_scoring_s).

Writes bench/results/rl_step.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import REPO_ROOT, write_result  # noqa: E402

SCRIPTS = {"ppo": "05_train_ppo.py", "grpo": "06_train_grpo.py", "rloo": "07_train_rloo.py"}
PARTS = ("generation", "reward", "training", "scoring", "step")
DTYPES = ("float32", "bfloat16")


def model_path() -> Path:
    """The default model, from this checkout (another checkout's stages read it from here)."""
    from utils.config import load_config

    config = load_config(str(REPO_ROOT / "configs" / "models" / "smollm2-135m.yaml"))
    return (REPO_ROOT / config["model"]["path"]).resolve()


def run_method(method: str, dtype: str, steps: int, policy_ckpt: str, extra: list[str], repo: Path = REPO_ROOT,
               name: str | None = None) -> dict:
    out_dir = REPO_ROOT / "outputs" / "bench_rl" / (name or dtype) / method
    command = [sys.executable, SCRIPTS[method], "--quick_test", "--steps", str(steps),
               "--policy_ckpt", str(Path(policy_ckpt).resolve()), "--output_dir", str(out_dir), "--overwrite",
               "--set", f"model.dtype={dtype}", "--set", f"model.path={model_path()}", *extra]
    subprocess.run(command, cwd=repo, check=True)
    log = json.loads((out_dir / "logs" / "training_log.json").read_text())
    records = [r for r in log if "time_step_s" in r][1:]  # the first step carries the warm-up
    manifest = json.loads((out_dir / "manifest.json").read_text())
    per_step = manifest["metrics"].get("completions_per_step")
    mean = {part: round(statistics.mean(r[f"time_{part}_s"] for r in records), 2)
            for part in PARTS if all(f"time_{part}_s" in r for r in records)}
    return {"steps_measured": len(records), "completions_per_step": per_step,
            "precision": manifest["precision"]["dtype"], "overrides": extra[1::2], "mean_seconds": mean,
            "seconds_per_completion": round(mean["step"] / per_step, 2) if per_step else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy_ckpt", required=True, help="the SFT LoRA checkpoint every method starts from")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default="ppo,grpo,rloo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every stage (e.g. data.processed_dir=...)")
    parser.add_argument("--before_repo", default=None, help="another checkout whose stages run first, in float32")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, from float32,bfloat16")
    parser.add_argument("--vllm", action="store_true", help="GRPO and RLOO also with algorithm.use_vllm=true")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME=KEY=VALUE[,...]",
                        help="also run each method with these overrides (repeatable)")
    parser.add_argument("--output", default="bench/results/rl_step.json")
    args = parser.parse_args()
    extra = [item for override in args.overrides for item in ("--set", override)]
    variants = {}
    for variant in args.variants:
        name, _, overrides = variant.partition("=")
        if not name or "=" not in overrides:
            parser.error(f"--variant {variant}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        variants[name] = [item for override in overrides.split(",") for item in ("--set", override)]
    if args.vllm:
        variants = {"vllm": ["--set", "algorithm.use_vllm=true"], **variants}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict = {}
    for method in methods:  # the runs of one method back to back: the machine's state is comparable
        results[method] = {}
        if args.before_repo:
            results[method]["before_float32"] = run_method(method, "float32", args.steps, args.policy_ckpt, extra,
                                                           Path(args.before_repo).resolve(), "before_float32")
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        results[method].update({dtype: run_method(method, dtype, args.steps, args.policy_ckpt, extra)
                                for dtype in dtypes})
        for dtype in dtypes:
            for name, overrides in variants.items():
                if method == "ppo" and "algorithm.use_vllm=true" in overrides:
                    continue  # PPO's rollouts have no vLLM path
                run = results[method][f"{dtype}_{name}"] = run_method(
                    method, dtype, args.steps, args.policy_ckpt, [*extra, *overrides], name=f"{dtype}_{name}")
                results[method][f"speedup_{name}_{dtype}"] = speedup(results[method][dtype]["mean_seconds"],
                                                                      run["mean_seconds"])
        if all(d in results[method] for d in DTYPES):
            fp32, bf16 = (results[method][d]["mean_seconds"] for d in DTYPES)
            results[method]["speedup_bf16"] = speedup(fp32, bf16)
        if args.before_repo and "bfloat16" in results[method]:
            results[method]["speedup_bf16_over_before"] = speedup(results[method]["before_float32"]["mean_seconds"],
                                                                  results[method]["bfloat16"]["mean_seconds"])
    write_result(args.output, {"benchmark": "rl_step", "steps": args.steps, "policy_ckpt": args.policy_ckpt,
                               "before_repo": args.before_repo, **results})


def speedup(slow: dict, fast: dict) -> dict:
    return {part: round(slow[part] / fast[part], 2) for part in PARTS if part in slow and fast.get(part, 0) > 0.05}


if __name__ == "__main__":
    main()
