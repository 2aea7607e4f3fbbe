"""Loading models and tokenizers the same way everywhere, and LoRA set-up.

A checkpoint is one of: the base model (config model.path), a LoRA adapter folder (adapter_config.json), or a
merged model folder (config.json). RL and DPO adapters are trained on top of the SFT model with its adapter
merged in; such an adapter lists the adapters beneath it in base_adapters.json, so loading it rebuilds the
same stack: base -> merge each listed adapter -> this adapter.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from utils.runs import REPO_ROOT, StageError
from utils import processes

BASE_ADAPTERS_FILE = "base_adapters.json"
log = logging.getLogger("finqa_rl")


def configure_torch(config: dict) -> torch.device:
    """Threads and device. On a CPU, torch's default thread count oversubscribes small machines, and several
    processes of one stage (utils.processes) share model.torch_threads between them; on CUDA each process takes
    the GPU of its local rank."""
    threads = int(config["model"].get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(max(1, threads // processes.local_world_size()))
    if torch.cuda.is_available():
        torch.cuda.set_device(processes.local_rank())
        return torch.device("cuda", processes.local_rank())
    return torch.device("cpu")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(path: str | Path, flag: str = "--policy_ckpt") -> str | None:
    """Why a folder is not a checkpoint this project can load (None when it is one): a LoRA adapter folder
    (adapter_config.json, adapter weights, and the adapters beneath it) or a model folder (config.json and
    weights). Looks at a few named files only, so /proc or /etc cost nothing."""
    path = Path(path)
    if not path.is_dir():
        return f"{flag} {path}: folder not found"
    if (path / "adapter_config.json").exists():
        config = _json_object(path / "adapter_config.json")
        if config is None or "peft_type" not in config:
            return f"{flag} {path}: adapter_config.json is not a PEFT adapter config (not a JSON object with peft_type)"
        if not any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
            return f"{flag} {path}: an adapter folder without adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})"
        if (path / BASE_ADAPTERS_FILE).exists():
            listed = _json_object(path / BASE_ADAPTERS_FILE)
            if listed is None or not isinstance(listed.get("adapters"), list) or \
                    not all(isinstance(a, str) for a in listed["adapters"]):
                return f"{flag} {path}: {BASE_ADAPTERS_FILE} is not {{\"adapters\": [folders]}}"
            for adapter in base_adapters(path):
                problem = checkpoint_problem(adapter, f"{flag} {path}: base adapter")
                if problem:
                    return problem
        return None
    if (path / "config.json").exists():
        if _json_object(path / "config.json") is None:
            return f"{flag} {path}: config.json is not a JSON object"
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            return f"{flag} {path}: a model folder without weights ({', '.join(WEIGHT_FILES)})"
        return None
    return f"{flag} {path}: not a checkpoint (no adapter_config.json or config.json)"


def require_checkpoint(path: str | Path, flag: str = "--policy_ckpt") -> Path:
    problem = checkpoint_problem(path, flag)
    if problem:
        raise StageError(problem)
    return Path(path)


def require_model_folder(path: str | Path) -> Path:
    """model.path: a model folder with weights and a tokenizer."""
    problem = checkpoint_problem(path, "model.path")
    if problem is None and (Path(path) / "adapter_config.json").exists():
        problem = f"model.path {path}: an adapter folder, not a base model"
    if problem is None and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        problem = f"model.path {path}: no tokenizer ({', '.join(TOKENIZER_FILES)})"
    if problem:
        raise StageError(problem + ("" if Path(path).is_dir() else " (run download.sh, or check the path)"))
    return Path(path)


class _loading:
    """Turns what transformers / peft raise on a broken folder into one line naming it."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (OSError, ValueError, KeyError, RuntimeError, TypeError)) \
                and not issubclass(exc_type, StageError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc_type.__name__
            raise StageError(f"{self.path}: could not be loaded ({exc_type.__name__}: {first[:200]})") from None
        return False


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    with _loading(model_path):
        tokenizer = AutoTokenizer.from_pretrained(require_model_folder(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise StageError(f"{model_path}: the tokenizer has no chat template")
    return tokenizer


def base_adapters(ckpt: str | Path) -> list[str]:
    """The adapters a checkpoint sits on. They are recorded as given (relative to the repository root when
    relative), so run folders stay movable together with the repository."""
    path = Path(ckpt) / BASE_ADAPTERS_FILE
    adapters = json.loads(path.read_text())["adapters"] if path.is_file() else []
    return [a if Path(a).is_absolute() or Path(a).exists() else str(REPO_ROOT / a) for a in adapters]


def is_adapter(ckpt: str | Path) -> bool:
    return (Path(ckpt) / "adapter_config.json").is_file()


def load_model(model_path: str | Path, ckpt: str | Path | None = None, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32, trainable: bool = False):
    """The base model, a LoRA checkpoint on it (with its base_adapters merged first), or a merged model.
    A LoRA checkpoint loaded for inference (trainable=False) comes back merged into a plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    if ckpt is not None:
        require_checkpoint(ckpt, "checkpoint")
    if ckpt is not None and not is_adapter(ckpt):
        with _loading(ckpt):
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    else:
        # adapters merged for inference are merged in float32, then the model is cast (bf16 would round them)
        load_dtype = torch.float32 if ckpt is not None and not trainable else dtype
        with _loading(model_path):
            model = AutoModelForCausalLM.from_pretrained(require_model_folder(model_path), dtype=load_dtype)
        if ckpt is not None:
            for adapter in base_adapters(ckpt):
                with _loading(adapter):
                    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            with _loading(ckpt):
                model = PeftModel.from_pretrained(model, ckpt, is_trainable=trainable)
            if not trainable:  # inference only: merged LoRA weights skip the adapter's extra matmuls
                model = model.merge_and_unload().to(dtype)
    model.to(device)
    if not trainable:
        model.eval()
    return model


def last_positions(n: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`logits_to_keep` for the last n of a batch's `length` positions, as indices. transformers reads an int as
    the slice hidden_states[:, -n:], a strided view, and a bf16 matmul on a CPU runs that as a batched matmul over a
    copy of the 49,152 x 576 LM head per row (0.52 s a call for 8 rows here, against 6 ms); indices gather the kept
    positions into a contiguous tensor first. The logits are the same."""
    return torch.arange(length - n, length, device=device)


def prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list:
    """Keys and values of one prefix (a batch of 1), per layer, to forward continuations on top of (rows_cache)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                logits_to_keep=last_positions(1, input_ids.shape[1], input_ids.device))
    return [(keys, values) for keys, values, *_ in out.past_key_values]


def rows_cache(prefix: list, rows: int):
    """The prefix's keys and values seen as `rows` rows (views, no copies), each row continuing on its own. In a
    causal model the prefix's positions do not depend on what follows, so the continuations' outputs are those of
    full-length forwards; with grad, every row's gradient flows back into the one prefix (the sum a batch of
    copies would get)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                        for keys, values in prefix])


def lora_config(config: dict):
    from peft import LoraConfig

    lora = config["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")


def merged_policy_base(config: dict, ckpt: str | Path | None, device: torch.device, dtype: torch.dtype):
    """The model an RL/DPO adapter is trained on: base with the starting checkpoint's adapters merged in.

    Returns (model, adapters) where adapters is what the new adapter's base_adapters.json must list.
    """
    from peft import PeftModel

    if ckpt is None:
        return load_model(config["model"]["path"], None, device, dtype), []
    if not is_adapter(ckpt):
        return load_model(config["model"]["path"], ckpt, device, dtype), []
    # merged in float32, then cast: the frozen weights are then exactly those 10_evaluate.py runs
    model = load_model(config["model"]["path"], None, device, torch.float32)
    adapters = base_adapters(ckpt) + [str(ckpt)]
    for adapter in adapters:
        with _loading(adapter):
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(dtype), adapters


class MergedCopy:
    """A plain model holding a LoRA policy's current weights merged (W + scale * B @ A), in the frozen weights'
    dtype, for generation: rollouts and validation decode a few rows at a time, where an unmerged adapter's two
    extra matmuls per layer and, under autocast, the per-step casts of every weight are most of a decode step.

    `model()` returns the copy, refreshed from the live adapter when `version` changed since the last call (a
    stage passes its optimizer step); refreshing rewrites only the adapted layers' weights from the frozen base
    and the adapter, so no rounding accumulates over steps. It costs one extra copy of the weights in memory."""

    def __init__(self, peft_model):
        import copy

        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            self.copy = copy.deepcopy(peft_model).merge_and_unload().eval()
        # a trainer's per-instance wrappers came along in the copy: trl's fused LM head replaces `forward` with one
        # that calls the *original* model's (in training mode: no KV cache), and gradient checkpointing adds a hook
        # that makes inputs require grad; the copy runs the class's own forward
        vars(self.copy).pop("forward", None)
        self.copy.disable_input_require_grads()
        for parameter in self.copy.parameters():
            parameter.requires_grad_(False)
        prefix = "base_model.model."
        targets = dict(self.copy.named_modules())
        self.layers = [(layer, targets[name[len(prefix):]]) for name, layer in peft_model.named_modules()
                       if isinstance(layer, LoraLayer)]
        self.version = None

    @torch.no_grad()
    def model(self, version=None):
        if version is None or version != self.version:
            for layer, target in self.layers:
                base = layer.get_base_layer().weight
                merged = base.float()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged = merged + layer.get_delta_weight(adapter).float()
                target.weight.copy_(merged.to(target.weight.dtype))
            self.version = version
        return self.copy


def save_adapter(model, tokenizer, dest: str | Path, adapters: list[str]) -> Path:
    """Save a LoRA adapter with the tokenizer and the stack it sits on."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if adapters:
        (dest / BASE_ADAPTERS_FILE).write_text(json.dumps({"adapters": adapters}, indent=2) + "\n")
    return dest


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
