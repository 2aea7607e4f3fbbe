"""Benchmark: SFT throughput (the 03 path) with padded batches against packed, padding-free batches.

The same train examples, the same model, LoRA and learning rate, one epoch each way, in this one process:
  padded   trl's SFTTrainer as 03 runs it: batches of training.batch_size examples padded to the longest
  packed   SFTConfig(packing=True): examples packed best-fit-decreasing into rows of max_seq_length tokens, no
           padding (transformers keeps packed examples from attending to each other via their position ids)
Trained tokens/s counts real tokens only. Model FLOPs utilisation = (forward + backward-through-activations
FLOPs, i.e. 2x the forward pass: LoRA leaves the frozen weights without gradients) / seconds / the measured
matmul peak.

    python bench/bench_sft.py --n_examples 32

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

from bench.machine import forward_flops, measure_machine, write_result  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.finqa_data import hf_dataset, load_processed  # noqa: E402
from utils.compute import precision  # noqa: E402
from utils.models import configure_torch, load_model, load_tokenizer, lora_config  # noqa: E402
from utils.training import trainer_arguments  # noqa: E402


def train_once(config: dict, rows: list[dict], packing: bool, seed: int, device, peak_gflops: float) -> dict:
    from trl import SFTConfig, SFTTrainer

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
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    tokens = sum(example_lengths)
    batch = config["training"]["batch_size"]
    if packing:
        padded_tokens = tokens
    else:  # the collator pads each batch to its longest example (pad_to_multiple_of unset)
        padded_tokens = sum(max(lengths[i: i + batch]) * len(lengths[i: i + batch])
                            for i in range(0, len(lengths), batch))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    flops = sum(2 * forward_flops(trainer.model.get_base_model(), n, n / 2) for n in example_lengths)
    return {"seconds": round(seconds, 2), "optimizer_steps": trainer.state.global_step, "rows": len(lengths),
            "real_tokens": tokens, "tokens_in_batches": padded_tokens,
            "padding_fraction": round(1 - tokens / padded_tokens, 3),
            "trained_tokens_per_second": round(tokens / seconds, 1),
            "model_flops_utilisation": round(flops / seconds / (peak_gflops * 1e9), 3),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/models/smollm2-135m.yaml")
    parser.add_argument("--data", default=None, help="processed jsonl (default: <processed_dir>/train.jsonl)")
    parser.add_argument("--n_examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="bench/results/sft.json")
    args = parser.parse_args()

    config = load_config(args.config)
    device = configure_torch(config)
    rows = load_processed(args.data or str(Path(config["data"]["processed_dir"]) / "train.jsonl"), args.n_examples)
    machine = measure_machine()
    padded = train_once(config, rows, False, args.seed, device, machine["matmul_gflops"])
    packed = train_once(config, rows, True, args.seed, device, machine["matmul_gflops"])
    write_result(args.output, {
        "benchmark": "sft", "model": config["model"]["name"], "n_examples": len(rows),
        "batch_size": config["training"]["batch_size"], "max_seq_length": config["training"]["max_seq_length"],
        "device": str(device), "machine_limits": machine, "padded": padded, "packed": packed,
        "speedup_packed_vs_padded": round(packed["trained_tokens_per_second"] / padded["trained_tokens_per_second"], 2),
    })


if __name__ == "__main__":
    main()
