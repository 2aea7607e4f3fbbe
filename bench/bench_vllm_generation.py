"""Benchmark: the two generation engines of 04/10 (generation.engine native | vllm) on the same prompts.

The same checkpoint (a LoRA adapter is merged, as both stages do), the same token ids, the same settings
(settings_from_config: greedy as 10 decodes, sampled as 04 and the RL rollouts do) and stop rules, at each
--n_prompts: the native path (utils.generation.generate) first, then vLLM (utils.vllm_engine.VllmEngine, its
start-up timed on its own), each engine with the config's generation.batch_size sequences at a time. For greedy
decoding at the largest size it also reports how many completions the two engines agree on and each one's execution
accuracy (FinQA's metric, utils.metrics): the tolerance the vLLM test states. Both engines run in this one process
in the same dtype (--dtype; default what model.dtype auto picks here), one after the other, nothing else running.

    python bench/bench_vllm_generation.py --policy_ckpt outputs/bench_sft/03_sft/ckpt_sft/best \
        --data datasets/finqa_core_processed/test.jsonl --n_prompts 32 128

Writes bench/results/vllm_generation.json (or --output).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)
import torch  # noqa: E402

from bench.machine import REPO_ROOT, write_result  # noqa: E402
from utils.compute import precision  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.finqa_data import load_processed  # noqa: E402
from utils.generation import GenerationStats, encode_prompt, generate, settings_from_config  # noqa: E402
from utils.metrics import aggregate, score_items  # noqa: E402
from utils.models import configure_torch, load_model, load_tokenizer  # noqa: E402
from utils.stage_inputs import reward_calculator  # noqa: E402
from utils import vllm_engine  # noqa: E402

MODES = ("greedy", "sampled")


def figures(seconds: float, groups: list[list], n_prompts: int) -> dict:
    tokens = sum(g.n_tokens for group in groups for g in group)
    return {"seconds": round(seconds, 2), "generated_tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 2), "prompts_per_second": round(n_prompts / seconds, 3)}


def accuracy(rows: list[dict], groups: list[list]) -> float:
    predictions = [{"id": row["id"], "completion": group[0].text} for row, group in zip(rows, groups)]
    return aggregate(score_items(rows, predictions, reward_calculator(None)))["execution_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/models/smollm2-135m.yaml")
    parser.add_argument("--policy_ckpt", default=None, help="checkpoint (default: the base model)")
    parser.add_argument("--data", default="datasets/finqa_core_processed/test.jsonl")
    parser.add_argument("--n_prompts", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(REPO_ROOT / "bench" / "results" / "vllm_generation.json"))
    args = parser.parse_args()

    config = load_config(args.config, overrides=[f"model.dtype={args.dtype}"])
    device = configure_torch(config)
    dtype = precision(config, device).inference_dtype
    rows = load_processed(args.data, max(args.n_prompts))
    tokenizer = load_tokenizer(config["model"]["path"])
    encoded = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    settings = {mode: settings_from_config(config, sampled=mode == "sampled") for mode in MODES}
    result = {"benchmark": "vllm_generation", "checkpoint": args.policy_ckpt or "base", "data": args.data,
              "dtype": str(dtype).removeprefix("torch."), "vllm_version": vllm_engine.installed_version(),
              "torch_threads": torch.get_num_threads(), "batch_size": config["generation"]["batch_size"],
              "max_new_tokens": config["generation"]["max_new_tokens"],
              "sampling": {"temperature": settings["sampled"].temperature, "top_p": settings["sampled"].top_p},
              "lookup_draft_tokens_greedy": settings["greedy"].lookup_draft_tokens,
              "mean_prompt_tokens": round(sum(map(len, encoded)) / len(encoded), 1), "native": {}, "vllm": {}}
    kept: dict[str, list] = {}

    model = load_model(config["model"]["path"], args.policy_ckpt, device, dtype)
    generate(model, tokenizer, encoded[:2], settings["greedy"], show_progress=False)  # warm-up
    for mode in MODES:
        for n in args.n_prompts:
            started = time.perf_counter()
            groups = generate(model, tokenizer, encoded[:n], settings[mode], seed=args.seed, show_progress=False,
                              stats=GenerationStats())
            result["native"][f"{mode}_{n}"] = figures(time.perf_counter() - started, groups, n)
            kept[f"native_{mode}_{n}"] = groups
            print(mode, n, "native", result["native"][f"{mode}_{n}"], flush=True)
    del model

    work = REPO_ROOT / "outputs" / "bench_vllm_weights"
    folder, written = vllm_engine.served_folder(config["model"]["path"], args.policy_ckpt, work)
    try:
        stats = vllm_engine.EngineStats()
        engine = vllm_engine.VllmEngine(folder, tokenizer, device, dtype, args.seed,
                                        max_model_len=max(map(len, encoded)) + config["generation"]["max_new_tokens"],
                                        max_num_seqs=config["generation"]["batch_size"], stats=stats)
        result["vllm"]["startup_seconds"] = round(stats.startup_seconds, 2)
        engine.generate(encoded[:2], settings["greedy"], args.seed)  # warm-up
        for mode in MODES:
            for n in args.n_prompts:
                started = time.perf_counter()
                groups = engine.generate(encoded[:n], settings[mode], args.seed)
                result["vllm"][f"{mode}_{n}"] = figures(time.perf_counter() - started, groups, n)
                kept[f"vllm_{mode}_{n}"] = groups
                print(mode, n, "vllm", result["vllm"][f"{mode}_{n}"], flush=True)
    finally:
        if written:
            shutil.rmtree(folder, ignore_errors=True)

    for mode in MODES:
        for n in args.n_prompts:
            result.setdefault("speedup_vllm_over_native", {})[f"{mode}_{n}"] = round(
                result["native"][f"{mode}_{n}"]["seconds"] / result["vllm"][f"{mode}_{n}"]["seconds"], 2)
    n = max(args.n_prompts)
    native, served = kept[f"native_greedy_{n}"], kept[f"vllm_greedy_{n}"]
    result["greedy_agreement"] = {
        "n_prompts": n, "identical_completions": sum(a[0].text == b[0].text for a, b in zip(native, served)),
        "execution_accuracy_native": accuracy(rows[:n], native),
        "execution_accuracy_vllm": accuracy(rows[:n], served)}
    write_result(args.output, result)


if __name__ == "__main__":
    main()
