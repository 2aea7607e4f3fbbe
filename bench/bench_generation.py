"""Benchmark: evaluation throughput of the batched generation path against a one-prompt-at-a-time loop.

Both run in this one process on the same model, prompts and settings (greedy, the same max_new_tokens, the same
stop rules), so their ratio is meaningful even on a busy shared CPU; absolute figures are this machine's.

    python bench/bench_generation.py                       # default model, 32 val prompts
    python bench/bench_generation.py --policy_ckpt outputs/run_001/03_sft/ckpt_sft/best --n_prompts 64

Writes bench/results/generation.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)
import torch  # noqa: E402

from transformers import StoppingCriteriaList  # noqa: E402

from utils.config import load_config  # noqa: E402
from utils.finqa_data import load_processed  # noqa: E402
from utils.generation import GenerationSettings, GenerationStats, JsonEndCriteria, generate, stop_token_ids  # noqa: E402
from utils.models import configure_torch, load_model, load_tokenizer  # noqa: E402
from utils.prompts import render_prompt  # noqa: E402


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """The plain way: model.generate on each prompt alone (no padding, no batching)."""
    stops = stop_token_ids(tokenizer)
    tokens, started = 0, time.time()
    for text in prompts:
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        length = inputs["input_ids"].shape[1]
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                                stopping_criteria=StoppingCriteriaList([JsonEndCriteria(tokenizer, length)]))
        tokens += output.shape[1] - length
    seconds = time.time() - started
    return {"seconds": round(seconds, 2), "generated_tokens": int(tokens),
            "tokens_per_second": round(tokens / seconds, 2), "examples_per_second": round(len(prompts) / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/models/smollm2-135m.yaml")
    parser.add_argument("--policy_ckpt", default=None, help="LoRA or merged checkpoint (default: base model)")
    parser.add_argument("--data", default=None, help="processed jsonl (default: <processed_dir>/val.jsonl)")
    parser.add_argument("--n_prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=None, help="default: generation.batch_size")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: generation.max_new_tokens")
    parser.add_argument("--output", default="bench/results/generation.json")
    args = parser.parse_args()

    config = load_config(args.config)
    device = configure_torch(config)
    data = args.data or str(Path(config["data"]["processed_dir"]) / "val.jsonl")
    rows = load_processed(data, args.n_prompts)
    tokenizer = load_tokenizer(config["model"]["path"])
    model = load_model(config["model"]["path"], args.policy_ckpt, device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens or config["generation"]["max_new_tokens"],
                                  batch_size=args.batch_size or config["generation"]["batch_size"])
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in rows]

    generate(model, tokenizer, prompts[:2], settings, show_progress=False)  # warm-up (allocations, kernels)
    stats = GenerationStats()
    generate(model, tokenizer, prompts, settings, stats=stats, desc="batched")
    batched = {"seconds": round(stats.seconds, 2), "generated_tokens": stats.n_generated_tokens,
               "tokens_per_second": round(stats.tokens_per_second, 2),
               "examples_per_second": round(len(prompts) / stats.seconds, 3)}
    plain = one_at_a_time(model, tokenizer, prompts, settings.max_new_tokens)

    result = {
        "benchmark": "generation", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": config["model"]["name"], "checkpoint": args.policy_ckpt, "n_prompts": len(prompts),
        "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "device": str(device),
        "batched": batched, "one_at_a_time": plain,
        "speedup_examples_per_second": round(batched["examples_per_second"] / plain["examples_per_second"], 2),
        "speedup_tokens_per_second": round(batched["tokens_per_second"] / plain["tokens_per_second"], 2),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"batched / one-at-a-time: {result['speedup_examples_per_second']}x examples/s, "
          f"{result['speedup_tokens_per_second']}x tokens/s")


if __name__ == "__main__":
    main()
