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

BASE_ADAPTERS_FILE = "base_adapters.json"
log = logging.getLogger("finqa_rl")


def configure_torch(config: dict) -> torch.device:
    """Threads and device. On a CPU, torch's default thread count oversubscribes small machines."""
    threads = int(config["model"].get("torch_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(config: dict, device: torch.device) -> torch.dtype:
    name = config["model"]["dtype"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
    if dtype is None:
        raise StageError(f"model.dtype must be float32, bfloat16 or float16, got '{name}'")
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("model.dtype %s on a CPU is very slow; using float32", name)
        return torch.float32
    return dtype


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StageError(f"{what} not found: {path} (run download.sh, or check the path)")
    return path


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_require_dir(model_path, "model folder"))
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
    if ckpt is not None and not is_adapter(ckpt):
        model = AutoModelForCausalLM.from_pretrained(_require_dir(ckpt, "checkpoint"), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(_require_dir(model_path, "model folder"), dtype=dtype)
        if ckpt is not None:
            _require_dir(ckpt, "checkpoint")
            for adapter in base_adapters(ckpt):
                model = PeftModel.from_pretrained(model, _require_dir(adapter, "base adapter")).merge_and_unload()
            model = PeftModel.from_pretrained(model, ckpt, is_trainable=trainable)
            if not trainable:  # inference only: merged LoRA weights skip the adapter's extra matmuls
                model = model.merge_and_unload()
    model.to(device)
    if not trainable:
        model.eval()
    return model


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

    model = load_model(config["model"]["path"], None, device, dtype)
    if ckpt is None:
        return model, []
    if not is_adapter(ckpt):
        return load_model(config["model"]["path"], ckpt, device, dtype), []
    adapters = base_adapters(ckpt) + [str(ckpt)]
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, adapters


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
