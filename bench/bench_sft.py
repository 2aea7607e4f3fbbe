"""Benchmark: SFT throughput (the 03 path) in float32 and in bf16, and optionally with packed batches.

The same train examples, the same model, LoRA and learning rate, one epoch each way, in this one process:
  before   (--before KEY=VALUE ...) fp32 with the settings 03 ran with before a change, e.g. lora.dropout=0.05,
           and trl's fused LM head scoring every position on a CPU (as before utils.training made it score the
           labelled ones only)
  fp32     trl's SFTTrainer as 03 runs it on a CPU without native bf16: batches of training.batch_size examples
           padded to the longest, float32 throughout
  bf16     the same with model.dtype bfloat16: bf16 frozen weights under bf16 autocast, float32 LoRA
           parameters, optimizer and loss
  packed   (--packing) bf16 with SFTConfig(packing=True): examples packed best-fit-decreasing into rows of
           max_seq_length tokens, no padding
Trained tokens/s counts real tokens only. Model FLOPs utilisation = (forward + backward-through-activations
FLOPs, i.e. 2x the forward pass: LoRA leaves the frozen weights without gradients) / seconds / the measured
matmul peak of the dtype the work ran in (and, for bf16, also of fp32).

    python bench/bench_sft.py --n_examples 16 --before lora.dropout=0.05

Writes bench/results/sft.json (or --output).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402,F401  (first: sets the threading environment before torch loads)
import torch  # noqa: E402

from bench.machine import forward_flops, measure_machine, peak_gflops, write_result  # noqa: E402
from utils.config import apply_overrides, load_config  # noqa: E402
from utils.finqa_data import hf_dataset, load_processed  # noqa: E402
from utils.compute import precision  # noqa: E402
from utils.models import configure_torch, load_model, load_tokenizer, lora_config  # noqa: E402
from utils.training import score_labelled_positions_only, trainer_arguments  # noqa: E402


def train_once(config: dict, rows: list[dict], packing: bool, seed: int, device, machine: dict,
               dtype: str, every_position: bool = False) -> dict:
    from trl import SFTConfig, SFTTrainer

    config = {**config, "model": {**config["model"], "dtype": dtype}}
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(config["model"]["path"])
    model = load_model(config["model"]["path"], device=device, dtype=precision(config, device).training_weights_dtype)
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(**trainer_arguments(
            config, Path(out_dir), seed, device, output_dir=out_dir, num_train_epochs=1,
            max_length=config["training"]["max_seq_length"], completion_only_loss=True, packing=packing,
            gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", lr_scheduler_type="constant"))
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=hf_dataset(rows, ["prompt", "completion"]), peft_config=lora_config(config))
        dataset = trainer.train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]]
        example_lengths = ([n for seq in dataset["seq_lengths"] for n in seq] if packing else lengths)
        score_labelled_positions_only(on_cpu=not every_position)  # trainer_arguments turned it on
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        score_labelled_positions_only()
    tokens = sum(example_lengths)
    batch = config["training"]["batch_size"]
    if packing:
        padded_tokens = tokens
    else:  # the collator pads each batch to its longest example (pad_to_multiple_of unset)
        padded_tokens = sum(max(lengths[i: i + batch]) * len(lengths[i: i + batch])
                            for i in range(0, len(lengths), batch))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    flops = sum(2 * forward_flops(trainer.model.get_base_model(), n, n / 2) for n in example_lengths)
    peak = peak_gflops(machine, getattr(torch, dtype))
    return {"dtype": dtype, "lm_head_scores": "every position" if every_position else "labelled positions",
            "seconds": round(seconds, 2), "optimizer_steps": trainer.state.global_step,
            "rows": len(lengths), "real_tokens": tokens, "tokens_in_batches": padded_tokens,
            "padding_fraction": round(1 - tokens / padded_tokens, 3),
            "trained_tokens_per_second": round(tokens / seconds, 1),
            "achieved_gflops": round(flops / seconds / 1e9, 1),
            "model_flops_utilisation": round(flops / seconds / (peak * 1e9), 3),
            "utilisation_of_fp32_peak": round(flops / seconds / (machine["matmul_gflops"] * 1e9), 3),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/models/smollm2-135m.yaml")
    parser.add_argument("--data", default=None, help="processed jsonl (default: <processed_dir>/train.jsonl)")
    parser.add_argument("--n_examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--packing", action="store_true", help="also train bf16 with packed, padding-free batches")
    parser.add_argument("--before", nargs="*", default=[], metavar="KEY=VALUE",
                        help="also train fp32 with these config overrides: the settings of before a change")
    parser.add_argument("--output", default="bench/results/sft.json")
    args = parser.parse_args()

    config = load_config(args.config)
    device = configure_torch(config)
    rows = load_processed(args.data or str(Path(config["data"]["processed_dir"]) / "train.jsonl"), args.n_examples)
    machine = measure_machine()
    runs = {}
    if args.before:
        before = apply_overrides(config, args.before)
        runs["before"] = {"overrides": args.before,
                          **train_once(before, rows, False, args.seed, device, machine, "float32",
                                                every_position=True)}
    runs |= {"fp32": train_once(config, rows, False, args.seed, device, machine, "float32"),
            "bf16": train_once(config, rows, False, args.seed, device, machine, "bfloat16")}
    if args.packing:
        runs["bf16_packed"] = train_once(config, rows, True, args.seed, device, machine, "bfloat16")
    write_result(args.output, {
        "benchmark": "sft", "model": config["model"]["name"], "n_examples": len(rows),
        "batch_size": config["training"]["batch_size"], "max_seq_length": config["training"]["max_seq_length"],
        "device": str(device), "machine_limits": machine, **runs,
        "speedup_bf16_vs_fp32": round(runs["bf16"]["trained_tokens_per_second"]
                                      / runs["fp32"]["trained_tokens_per_second"], 2),
        **({"speedup_bf16_vs_before": round(runs["bf16"]["trained_tokens_per_second"]
                                            / runs["before"]["trained_tokens_per_second"], 2)} if args.before else {}),
    })


if __name__ == "__main__":
    main()
