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


def measure_machine(size: int = 2048, bandwidth_mb: int = 512) -> dict:
    """Peak fp32 matmul FLOP/s (a square matmul, the best case for the BLAS) and memory bandwidth (a copy
    much larger than the caches; read + write bytes), with torch's current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    matmul = _best_seconds(lambda: a @ b, 5)
    source = torch.empty(bandwidth_mb * 2**20 // 4)
    dest = torch.empty_like(source)
    copy = _best_seconds(lambda: dest.copy_(source), 5)
    return {"matmul_gflops": round(2 * size**3 / matmul / 1e9, 1),
            "memory_gb_per_s": round(2 * source.numel() * 4 / copy / 1e9, 1),
            "torch_threads": torch.get_num_threads()}


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


def write_result(path: str | Path, result: dict) -> None:
    result = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), **result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
