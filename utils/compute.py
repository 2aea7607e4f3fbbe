"""Which number format a stage computes in, and why (docs/design.md "Compute").

`model.dtype: auto` picks bfloat16 where the device runs it natively and fast, float32 elsewhere:
- CUDA: bfloat16 when the GPU runs it natively: compute capability 8.0 (Ampere) or newer. Not
  torch.cuda.is_bf16_supported(), which is True on a V100 (7.0) or T4 (7.5) too, where bf16 is emulated and slower
  than float32. Not yet run on a GPU (tests/test_gpu_records.py monkeypatches torch.cuda).
- CPU: bfloat16 only when /proc/cpuinfo lists avx512_bf16 or amx_bf16 AND a short probe measures bf16 matmuls
  clearly faster than fp32 (>= BF16_MIN_SPEEDUP at a prefill-shaped and a decode-shaped matmul of the model's
  sizes, the two dtypes timed in alternation, best of several rounds), so nothing gets slower on a CPU where bf16
  is emulated (hundreds of times slower on AVX2: there the probe is never run). The figures measured are recorded
  with the choice.
`float32` and `bfloat16` force the format; `float16` is honoured on CUDA and runs as float32 on a CPU.

How each kind of work uses it (the way the field does mixed precision):
- inference (04, 10): weights loaded in float32, LoRA adapters merged in float32, then the model is cast to the
  compute dtype (Precision.inference_dtype);
- training (03, 05-07, 09): frozen weights in the compute dtype, trainable LoRA parameters in float32 (peft
  upcasts an adapter on bf16 weights), under autocast to the compute dtype, so the optimizer state and the loss
  reductions stay float32 (trl's `bf16` flag; Precision.autocast() for the project's PPO); rollouts and
  validation generate from a merged copy in the same dtype (utils.models.MergedCopy).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CUDA_BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores
BF16_MIN_SPEEDUP = 1.5          # bf16 must beat fp32 by this much at every probed shape to be chosen
PROBE_SHAPES = ((512, 576, 1536), (64, 576, 1536))  # (rows, in, out): prefill- and decode-shaped, SmolLM2 sizes
NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    dtype: str            # what the matmuls run in: "bfloat16" or "float32" (or "float16" on CUDA)
    requested: str        # model.dtype as configured
    device: str
    reason: str
    probe: dict | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return NAMES[self.dtype]

    @property
    def is_mixed(self) -> bool:
        return self.dtype != "float32"

    @property
    def inference_dtype(self) -> torch.dtype:
        return self.torch_dtype

    @property
    def training_weights_dtype(self) -> torch.dtype:
        """Frozen weights while training: the compute dtype (no per-op casts of them under autocast; they never
        change, and adapters beneath a new one are merged in float32 first: utils.models.merged_policy_base)."""
        return self.torch_dtype

    def autocast(self):
        """Autocast to the compute dtype (nothing when it is float32)."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.torch_dtype)

    def record(self) -> dict:
        """What a manifest records: the dtype, what was asked for, why, and the probe's figures."""
        return asdict(self)


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The CPU's native bf16 instruction sets, from its flags."""
    try:
        words = set(Path(cpuinfo).read_text().split())
    except OSError:
        return []
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in words]


def _best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


def probe_cpu_matmul(rounds: int = 6, repeats: int = 3) -> dict:
    """fp32 and bf16 matmul GFLOP/s at PROBE_SHAPES with torch's current threads (well under a second).

    The two dtypes are timed in alternation over several rounds and each keeps its best time: a burst of load
    from another process then slows some windows of both, not the best of either. (A probe that timed all of fp32,
    then all of bf16, measured 1.3x beside a busy process on a machine that measures 2.2-2.5x idle, and a study's
    stage ran in fp32 while its siblings ran in bf16.)"""
    shapes = []
    for rows, inner, outer in PROBE_SHAPES:
        pairs = {dtype: (torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype))
                 for dtype in (torch.float32, torch.bfloat16)}
        for a, b in pairs.values():
            a @ b  # warm-up
        best = {dtype: float("inf") for dtype in pairs}
        for _ in range(rounds):
            for dtype, (a, b) in pairs.items():
                best[dtype] = min(best[dtype], _best_seconds(a, b, repeats))
        fp32, bf16 = (2 * rows * inner * outer / best[dtype] / 1e9 for dtype in pairs)
        shapes.append({"shape": [rows, inner, outer], "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
                       "speedup": round(bf16 / fp32, 2)})
    return {"torch_threads": torch.get_num_threads(), "shapes": shapes,
            "min_speedup": min(shape["speedup"] for shape in shapes)}


@functools.lru_cache(maxsize=None)
def _cpu_choice(threads: int) -> tuple[str, str, dict | None]:
    flags = cpu_bf16_flags()
    if not flags:
        return "float32", "auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag)", None
    probe = probe_cpu_matmul()
    probe["cpu_flags"] = flags
    if probe["min_speedup"] >= BF16_MIN_SPEEDUP:
        return "bfloat16", (f"auto: native bf16 ({', '.join(flags)}), measured {probe['min_speedup']}x fp32's "
                            f"matmul speed at the slowest probed shape"), probe
    return "float32", (f"auto: bf16 measured only {probe['min_speedup']}x fp32 (< {BF16_MIN_SPEEDUP}x) although "
                       f"the CPU lists {', '.join(flags)}"), probe


def choose_precision(requested: str, device: torch.device) -> Precision:
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            capability = tuple(torch.cuda.get_device_capability(device))
            shown, needed = (".".join(map(str, c)) for c in (capability, CUDA_BF16_CAPABILITY))
            if capability >= CUDA_BF16_CAPABILITY:
                return Precision("bfloat16", requested, kind,
                                 f"auto: GPU compute capability {shown} (>= {needed}): native bf16")
            return Precision("float32", requested, kind,
                             f"auto: GPU compute capability {shown} (< {needed}): bf16 would be emulated")
        dtype, reason, probe = _cpu_choice(torch.get_num_threads())
        return Precision(dtype, requested, kind, reason, probe)
    if requested == "float16" and kind == "cpu":
        return Precision("float32", requested, kind, "float16 has no fast CPU path: float32")
    return Precision(requested, requested, kind, f"model.dtype {requested} (set in the config)")


def precision(config: dict, device: torch.device | None = None) -> Precision:
    """The precision a stage runs in (configure_torch's thread count applies to the probe)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return choose_precision(config["model"]["dtype"], device)
