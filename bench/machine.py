"""What every benchmark needs: this machine's measured limits, the model's FLOPs per token, the result file.

Absolute times on a shared CPU are noise; the ratios a benchmark measures within one run are not, and the
measured limits turn times into fractions of what the machine can do.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


MODEL_SHAPES = {"prefill (512 x 576 x 1536)": (512, 576, 1536), "decode (64 x 576 x 1536)": (64, 576, 1536),
                "decode (16 x 576 x 1536)": (16, 576, 1536), "output head (512 x 576 x 49152)": (512, 576, 49152)}


def _matmul_gflops(rows: int, inner: int, outer: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
    return round(2 * rows * inner * outer / _best_seconds(lambda: a @ b, repeats) / 1e9, 1)


def measure_machine(size: int = 2048, bandwidth_mb: int = 512, bf16: bool = True) -> dict:
    """Peak matmul FLOP/s in fp32 and bf16 (a square matmul, the best case for the BLAS, and the shapes
    SmolLM2-135M's layers use: the limit each part of the work can reach), and memory bandwidth (a copy much larger
    than the caches; read + write bytes), with torch's current thread count. bf16=False leaves bf16 out (on a CPU
    without native bf16 it is emulated, hundreds of times slower)."""
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
    source = torch.empty(bandwidth_mb * 2**20 // 4)
    dest = torch.empty_like(source)
    copy = _best_seconds(lambda: dest.copy_(source), 5)
    result = {"matmul_gflops": _matmul_gflops(size, size, size, torch.float32),
              "bf16_matmul_gflops": _matmul_gflops(size, size, size, torch.bfloat16) if bf16 else None,
              "memory_gb_per_s": round(2 * source.numel() * 4 / copy / 1e9, 1),
              "torch_threads": torch.get_num_threads(),
              "shapes": {name: {label: _matmul_gflops(*shape, dtype) for label, dtype in dtypes.items()}
                         for name, shape in MODEL_SHAPES.items()}}
    return result


def peak_gflops(machine: dict, dtype: torch.dtype) -> float:
    """The square-matmul peak of a dtype (bf16's where the work ran in bf16)."""
    return machine["bf16_matmul_gflops"] if dtype == torch.bfloat16 else machine["matmul_gflops"]


def linear_parameters(model) -> tuple[int, int]:
    """(parameters in the transformer's linear layers, parameters in the output head)."""
    head = model.get_output_embeddings()
    head_params = head.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head_params
    return linear, head_params


def forward_flops(model, n_tokens: int, context: float, n_logits: int | None = None) -> float:
    """Forward-pass FLOPs for n_tokens tokens attending to `context` tokens on average: 2 per weight per token
    in the linear layers, the output head only for the n_logits positions whose logits are computed, and the
    attention scores and weighted sum (4 * layers * hidden * context per token)."""
    linear, head = linear_parameters(model)
    config = model.config
    attention = 4 * config.num_hidden_layers * config.hidden_size * context
    return n_tokens * (2 * linear + attention) + 2 * head * (n_tokens if n_logits is None else n_logits)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def best_in_turn(run, ways, repeats: int) -> dict[str, float]:
    """Best seconds of run(way) for each way, the ways timed in turn (a drifting machine slows each alike), after
    one warm-up each."""
    for way in ways:
        run(way)
    seconds = {way: float("inf") for way in ways}
    for _ in range(repeats):
        for way in ways:
            started = time.perf_counter()
            run(way)
            seconds[way] = min(seconds[way], time.perf_counter() - started)
    return seconds


def abs_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs": round(float((a - b).abs().max()), 5), "mean_abs": round(float((a - b).abs().mean()), 6)}


def cut_gold_answer(tokenizer, row: dict, max_tokens: int, rng) -> list[int]:
    """A stand-in for a sampled completion: the row's gold answer (+ end of turn), at most max_tokens, cut at a
    random length from half of it to all of it."""
    answer = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]
    answer = (answer + [tokenizer.eos_token_id])[:max_tokens]
    return answer[:rng.randint(max(1, len(answer) // 2), len(answer))]


def stage_setup(algorithm_config: str, overrides: list[str]):
    """The default model's config with an algorithm's (no quick test) and --set overrides, torch threads set, the
    compute precision model.dtype picks here, the tokenizer: (config, precision, tokenizer)."""
    from utils.compute import precision
    from utils.config import load_config
    from utils.models import configure_torch, load_tokenizer

    config = load_config(str(REPO_ROOT / "configs/models/smollm2-135m.yaml"), str(REPO_ROOT / algorithm_config),
                         False, overrides)
    configure_torch(config)
    return config, precision(config), load_tokenizer(config["model"]["path"])


def policy_with_new_adapter(config: dict, ckpt: str, dtype: torch.dtype, seed: int, prepare_base=None):
    """The policy as the RL stages build it: the checkpoint merged into the frozen weights (prepare_base(base) runs
    next, if given), then a new LoRA adapter, here with small random B so that it is in the computation."""
    from peft import get_peft_model

    from utils.models import lora_config, merged_policy_base

    base, _ = merged_policy_base(config, ckpt, torch.device("cpu"), dtype)
    if prepare_base is not None:
        prepare_base(base)
    policy = get_peft_model(base, lora_config(config))
    torch.manual_seed(seed)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=1e-3)
    return policy


def write_result(path: str | Path, result: dict) -> None:
    result = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(REPO_ROOT))
    from utils.compute import cpu_bf16_flags

    parser = argparse.ArgumentParser(description="This machine's matmul and copy speeds (2 torch threads).")
    parser.add_argument("output", nargs="?", default=str(REPO_ROOT / "bench" / "results" / "machine.json"))
    output = parser.parse_args().output
    torch.set_num_threads(2)
    flags = cpu_bf16_flags()
    write_result(output, {"benchmark": "machine", "cpu_bf16_flags": flags, **measure_machine(bf16=bool(flags))})
