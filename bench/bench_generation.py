"""Benchmark: generation throughput (the 04/10 path) against the plain ways and against the machine's limit.

Ways to greedy-decode the same prompts with the same model and stop rules, in this one process, all in one dtype
(--dtype; default: what model.dtype auto picks on this machine):
  project        utils.generation.generate: shared-prefix KV cache, length-chunked prefill, a preallocated KV
                 cache, a decode loop that drops finished rows and checks prompt-lookup guesses
  project_without_lookup  the same with generation.lookup_draft_tokens 0 (one token per row per step)
  hf_batched     transformers' model.generate on batches (left padding, prompts sorted by length)
  one_at_a_time  transformers' model.generate on each prompt alone (the plain loop)
  project_fp32   (when the dtype is not float32) the project path on the float32 model: the path before bf16
and, with --before_repo DIR, the stage itself: 10_evaluate.py of another checkout (e.g. `git worktree add /tmp/before
<commit>`) in float32 against this checkout's in --dtype, on the first --n_prompts items of the same split, each
its own process, with the config's generation settings (their manifests' generation seconds and tokens; the path
before a change, in the same run);
and the machine's limit: the measured matmul FLOP/s and memory bandwidth, turned into a tokens/s ceiling for this
model and these prompts (all FLOPs at peak; and, for decoding one prompt at a time, reading the weights once per
token). Ratios within one run are the result; absolute figures are this machine's. With --repeats N every path
runs N times in turn and the figures are medians (the speed-up: the median of each repeat's ratio).

    python bench/bench_generation.py --policy_ckpt outputs/run_001/03_sft/ckpt_sft/best --n_prompts 32 --repeats 3

Writes bench/results/generation.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)
import torch  # noqa: E402
from transformers import StoppingCriteriaList  # noqa: E402

from bench.machine import REPO_ROOT, forward_flops, measure_machine, peak_gflops, weight_bytes, write_result  # noqa: E402
from utils.compute import precision  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.finqa_data import load_processed  # noqa: E402
from utils.generation import (GenerationSettings, GenerationStats, JsonEndCriteria, generate,  # noqa: E402
                              json_object_end, stop_token_ids)
from utils.models import configure_torch, load_model, load_tokenizer  # noqa: E402
from utils.prompts import render_prompt  # noqa: E402


def _figures(seconds: float, n_tokens: int, n_prompts: int, useful_flops: float, peak_gflops: float) -> dict:
    return {"seconds": round(seconds, 2), "generated_tokens": int(n_tokens),
            "tokens_per_second": round(n_tokens / seconds, 2), "examples_per_second": round(n_prompts / seconds, 3),
            "model_flops_utilisation": round(useful_flops / seconds / (peak_gflops * 1e9), 3)}


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    """transformers' generate, batch_size prompts at a time (1 = the plain loop); seconds and generated tokens."""
    stops = stop_token_ids(tokenizer)
    tokenizer.padding_side = "left"
    ordered = sorted(prompts, key=lambda text: -len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    tokens, started = 0, time.time()
    for start in range(0, len(ordered), batch_size):
        inputs = tokenizer(ordered[start: start + batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        length = inputs["input_ids"].shape[1]
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                                stopping_criteria=StoppingCriteriaList([JsonEndCriteria(tokenizer, length)]))
        generated = output[:, length:]
        # rows that stopped early are padded (the pad token may be a stop token too): a row ends at its first
        # stop token, which counts unless the JSON object was already complete (stopped there, then padded)
        for row in generated.tolist():
            end = next((i for i, token in enumerate(row) if token in stops or token == tokenizer.pad_token_id),
                       len(row))
            closed = json_object_end(tokenizer.decode(row[:end], skip_special_tokens=True)) >= 0
            tokens += end if closed or end == len(row) else end + 1
    return time.time() - started, tokens


def stage_generation(repo: Path, dtype: str, policy_ckpt: str, data: Path, n_items: int, name: str,
                     model_path: str) -> dict:
    """10_evaluate.py of the checkout `repo` on the first n_items of `data` (a processed split) in `dtype`: the
    generation figures and the execution accuracy its manifest records."""
    out_dir = REPO_ROOT / "outputs" / "bench_generation" / name
    command = [sys.executable, "10_evaluate.py", "--label", name, "--policy_ckpt", str(Path(policy_ckpt).resolve()),
               "--output_dir", str(out_dir), "--overwrite", "--set", f"model.dtype={dtype}",
               "--set", f"model.path={Path(model_path).resolve()}", "--set", f"data.processed_dir={data.parent.resolve()}",
               "--set", f"evaluation.split={data.stem}", "--set", f"evaluation.max_examples={n_items}"]
    subprocess.run(command, cwd=repo, check=True)
    metrics = json.loads((out_dir / "manifest.json").read_text())["metrics"]
    return {"checkout": str(repo), "dtype": dtype, **metrics["generation"],
            "execution_accuracy": metrics["execution_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/models/smollm2-135m.yaml")
    parser.add_argument("--policy_ckpt", default=None, help="LoRA or merged checkpoint (default: base model)")
    parser.add_argument("--data", default=None, help="processed jsonl (default: <processed_dir>/val.jsonl)")
    parser.add_argument("--n_prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=None, help="default: generation.batch_size")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: generation.max_new_tokens")
    parser.add_argument("--skip_hf_batched", action="store_true", help="leave out transformers' batched generate")
    parser.add_argument("--repeats", type=int, default=1, help="measure every path this many times, in turn; "
                        "the figures are the medians")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="dtype of every path (default: model.dtype auto's choice on this machine)")
    parser.add_argument("--before_repo", default=None,
                        help="also time 10_evaluate.py of this other checkout in float32 against this one's")
    parser.add_argument("--output", default="bench/results/generation.json")
    args = parser.parse_args()

    config = load_config(args.config)
    device = configure_torch(config)
    data = args.data or str(Path(config["data"]["processed_dir"]) / "val.jsonl")
    rows = load_processed(data, args.n_prompts)
    tokenizer = load_tokenizer(config["model"]["path"])
    dtype_name = args.dtype or precision(config, device).dtype
    dtype = getattr(torch, dtype_name)
    model_fp32 = load_model(config["model"]["path"], args.policy_ckpt, device)
    model = model_fp32 if dtype == torch.float32 else load_model(config["model"]["path"], args.policy_ckpt, device,
                                                                 dtype)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens or config["generation"]["max_new_tokens"],
                                  batch_size=args.batch_size or config["generation"]["batch_size"],
                                  lookup_draft_tokens=config["generation"]["lookup_draft_tokens"],
                                  compute_dtype=dtype_name)
    prompts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    machine = measure_machine(bf16=dtype == torch.bfloat16)
    peak = peak_gflops(machine, dtype)

    # warm-up at full size, so that first-use costs (allocations, kernel choices) fall outside the timed pass
    generate(model, tokenizer, prompts[:settings.batch_size], settings, show_progress=False)

    def project_path(path_settings: GenerationSettings, desc: str, path_model=model):
        stats = GenerationStats()
        generations = generate(path_model, tokenizer, prompts, path_settings, stats=stats, desc=desc)
        return stats.seconds, stats.n_generated_tokens, stats, generations

    paths = {"project": lambda: project_path(settings, "project")}
    if settings.lookup_draft_tokens:  # the same path without prompt-lookup guesses: what they add
        paths["project_without_lookup"] = lambda: project_path(replace(settings, lookup_draft_tokens=0),
                                                               "project, no lookup")
    if not args.skip_hf_batched:
        paths["hf_batched"] = lambda: hf_generate(model, tokenizer, prompts, settings.max_new_tokens,
                                                  settings.batch_size)
    paths["one_at_a_time"] = lambda: hf_generate(model, tokenizer, prompts, settings.max_new_tokens, 1)
    if dtype != torch.float32:
        generate(model_fp32, tokenizer, prompts[:settings.batch_size], replace(settings, compute_dtype="float32"),
                 show_progress=False)  # its own warm-up
        paths["project_fp32"] = lambda: project_path(replace(settings, compute_dtype="float32"), "project, fp32",
                                                     model_fp32)
    # Repeats run every path in turn, so that each repeat's ratios compare paths measured within minutes of each
    # other; this CPU's speed drifts by up to ~20% over longer spans. The result is the median over repeats.
    runs: dict[str, list] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            runs[name].append(run())
    stats, generations = runs["project"][0][2], runs["project"][0][3]

    # The work a plain forward pass over every prompt and answer does (logits only where a token is chosen):
    # the same yardstick for every path, so its utilisation figures compare directly.
    prompt_lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in prompts]
    answer_lengths = [group[0].n_tokens for group in generations]
    useful_flops = sum(forward_flops(model, p, p / 2, n_logits=1) + forward_flops(model, a, p + a / 2)
                       for p, a in zip(prompt_lengths, answer_lengths))

    def figures(name: str) -> dict:
        seconds = statistics.median(run[0] for run in runs[name])
        tokens = runs[name][0][1]
        if any(run[1] != tokens for run in runs[name]) and name != "project_fp32":
            raise SystemExit(f"{name}: generated token counts differ between repeats (greedy decoding should not)")
        result = _figures(seconds, tokens, len(prompts), useful_flops, peak)
        result["seconds_per_repeat"] = [round(run[0], 2) for run in runs[name]]
        if name.startswith("project"):
            result.update({"prefill_seconds": round(statistics.median(run[2].prefill_seconds for run in runs[name]), 2),
                           "decode_seconds": round(statistics.median(run[2].decode_seconds for run in runs[name]), 2),
                           "prompt_tokens": stats.n_prompt_tokens, "prefill_tokens": stats.n_prefill_tokens,
                           "decode_steps": runs[name][0][2].n_decode_steps})
        return result

    result = {"benchmark": "generation", "model": config["model"]["name"], "checkpoint": args.policy_ckpt,
              "dtype": dtype_name,
              "n_prompts": len(prompts), "batch_size": settings.batch_size,
              "lookup_draft_tokens": settings.lookup_draft_tokens,
              "max_new_tokens": settings.max_new_tokens, "mean_prompt_tokens": round(sum(prompt_lengths) / len(prompts), 1),
              "mean_answer_tokens": round(sum(answer_lengths) / len(prompts), 1), "device": str(device),
              "repeats": args.repeats, "machine_limits": machine}
    result.update({name: figures(name) for name in paths})
    project = result["project"]

    compute_bound = useful_flops / (peak * 1e9)
    one_at_a_time_bandwidth_bound = stats.n_generated_tokens * weight_bytes(model) / (machine["memory_gb_per_s"] * 1e9)
    result["ceiling"] = {
        "tokens_per_second_all_flops_at_peak": round(stats.n_generated_tokens / compute_bound, 2),
        "tokens_per_second_one_at_a_time_weights_read_per_token": round(
            stats.n_generated_tokens / (one_at_a_time_bandwidth_bound + compute_bound), 2),
    }
    # the same prompts in every path: the examples/s ratio is the ratio of seconds
    per_repeat = [round(slow[0] / fast[0], 2) for fast, slow in zip(runs["project"], runs["one_at_a_time"])]
    result["speedup_vs_one_at_a_time"] = {"median": round(statistics.median(per_repeat), 2),
                                          "per_repeat": per_repeat}
    if "project_fp32" in result:
        result["speedup_vs_project_fp32"] = round(statistics.median(
            slow[0] / fast[0] for fast, slow in zip(runs["project"], runs["project_fp32"])), 2)
        fp32_texts = [group[0].text for group in runs["project_fp32"][0][3]]
        result["same_answer_as_fp32"] = round(sum(a == b for a, b in zip(fp32_texts, [g[0].text for g in generations]))
                                              / len(prompts), 3)
    if "hf_batched" in result:
        result["speedup_vs_hf_batched"] = round(statistics.median(
            slow[0] / fast[0] for fast, slow in zip(runs["project"], runs["hf_batched"])), 2)
    if args.before_repo:  # the stage, before and now, each in its own process (the models above are freed first)
        del model, model_fp32
        stage = {"before_float32": stage_generation(Path(args.before_repo).resolve(), "float32", args.policy_ckpt,
                                                    Path(data), len(rows), "before_float32", config["model"]["path"]),
                 "now": stage_generation(REPO_ROOT, dtype_name, args.policy_ckpt, Path(data), len(rows), "now",
                                         config["model"]["path"])}
        stage["speedup_now_vs_before"] = round(stage["before_float32"]["seconds"] / stage["now"]["seconds"], 2)
        result["stage_10"] = stage
    write_result(args.output, result)
    speedup = result["speedup_vs_one_at_a_time"]
    print(f"project / one-at-a-time: {speedup['median']}x (median of {args.repeats} repeats: {speedup['per_repeat']}); "
          f"model FLOPs utilisation {project['model_flops_utilisation']:.0%}")


if __name__ == "__main__":
    main()
