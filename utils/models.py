"""Loading models and tokenizers the same way everywhere, and LoRA set-up.

A checkpoint is one of: the base model (config model.path), a LoRA adapter folder (adapter_config.json), or a
merged model folder (config.json). RL and DPO adapters are trained on top of the SFT model with its adapter
merged in; such an adapter lists the adapters beneath it in base_adapters.json, so loading it rebuilds the
same stack: base -> merge each listed adapter -> this adapter.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from utils.files import read_json, write_json_atomic
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
                "pytorch_model.bin.index.json")  # in the order transformers looks for them
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # in the order peft looks for them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def checkpoint_problem(path: str | Path, flag: str = "--policy_ckpt") -> str | None:
    """Why a folder is not a checkpoint this project can load (None when it is one): a LoRA adapter folder
    (adapter_config.json, adapter weights, and the adapters beneath it) or a model folder (config.json and
    weights). Looks at a few named files only (the weights' headers, not their tensors), so /proc or /etc cost
    nothing and a broken file is named before any model loads."""
    try:
        _check_checkpoint(str(path))
    except StageError as err:
        return f"{flag} {path}: {err}"
    return None


def checkpoint_kind(path: str | Path) -> str | None:
    """What a folder claims to be, before its files are checked: "adapter" (adapter_config.json), "model"
    (config.json) or None."""
    # os.path rather than pathlib: it answers False for a name too long or with a NUL byte instead of raising
    if not os.path.isdir(path):
        return None
    if os.path.lexists(Path(path) / "adapter_config.json"):
        return "adapter"
    return "model" if os.path.lexists(Path(path) / "config.json") else None


def is_adapter(ckpt: str | Path) -> bool:
    return checkpoint_kind(ckpt) == "adapter"


def _check_checkpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise StageError("folder not found")
    folder, kind = Path(path), checkpoint_kind(path)
    if kind == "adapter":
        _check_adapter(folder)
        _check_stack(folder)
    elif kind == "model":
        if not isinstance(read_json(folder / "config.json"), dict):
            raise StageError(f"{folder / 'config.json'}: not a JSON object")
        _check_weights(folder, WEIGHT_FILES, "a model folder without weights")
    else:
        raise StageError("not a checkpoint (no adapter_config.json or config.json)")


def _check_adapter(folder: Path) -> None:
    """adapter_config.json and the adapter's weights; the adapters beneath it are _check_stack's."""
    config = read_json(folder / "adapter_config.json")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        # the project merges LoRA adapters only (merge_and_unload); another PEFT type fails deep inside peft
        raise StageError(f"{folder / 'adapter_config.json'}: not a LoRA adapter config (a JSON object with "
                         f"peft_type LORA)")
    _check_weights(folder, ADAPTER_WEIGHT_FILES, "an adapter folder without adapter weights")


def _check_weights(folder: Path, names: tuple[str, ...], missing: str) -> None:
    """The weights file the loader will pick (the first of `names` present) has a readable safetensors header,
    or is an index whose shards do. A pickled .bin cannot be checked without unpickling it: _loading names it."""
    present = [name for name in names if os.path.isfile(folder / name)]
    if not present:
        raise StageError(f"{missing} ({', '.join(names)})")
    weights = folder / present[0]
    if weights.name.endswith(".safetensors"):
        _check_safetensors(weights)
    elif weights.name.endswith(".index.json"):
        index = read_json(weights)
        shards = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(shards, dict) or not shards or not all(isinstance(s, str) for s in shards.values()) \
                or not isinstance(index.get("metadata"), dict):
            raise StageError(f"{weights}: not a weights index (a JSON object with metadata and a weight_map of "
                             f"tensor -> shard file)")
        for shard in sorted(set(shards.values())):
            if not os.path.isfile(folder / shard):
                raise StageError(f"{weights}: shard {shard} not found")
            if shard.endswith(".safetensors"):
                _check_safetensors(folder / shard)


def _check_safetensors(path: Path) -> None:
    """Reads the header only (safetensors checks that it covers the whole file, so a truncated one fails)."""
    try:
        with safe_open(path, framework="pt") as weights:
            empty = not weights.keys()
    except (SafetensorError, OSError) as err:
        raise StageError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    if empty:  # peft would load it with a warning and leave the adapter at its initial weights
        raise StageError(f"{path}: holds no tensors")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _check_stack(ckpt: Path) -> None:
    """The adapters base_adapters.json lists are the stack the checkpoint was trained on, bottom first; each is
    a LoRA adapter whose own base_adapters.json lists exactly the adapters before it (what save_adapter writes).
    Checked one level down, never by recursion, so a list that loops back is a cycle here, not a RecursionError."""
    listing = ckpt / BASE_ADAPTERS_FILE
    itself = os.path.realpath(ckpt)
    below: list[str] = []  # real paths of the adapters listed so far
    for adapter in base_adapters(ckpt):
        if not os.path.isdir(adapter):
            raise StageError(f"{listing}: lists {adapter}, which is not a folder")
        real = os.path.realpath(adapter)
        if real == itself:
            raise StageError(f"{listing}: lists the checkpoint itself (a cycle)")
        if real in below:
            raise StageError(f"{listing}: lists {adapter} twice")
        if not is_adapter(adapter):
            raise StageError(f"{listing}: lists {adapter}, which is not a LoRA adapter folder (no adapter_config.json)")
        _check_adapter(Path(adapter))
        beneath = [os.path.realpath(a) for a in base_adapters(adapter)]
        if itself in beneath:
            raise StageError(f"{listing}: lists {adapter}, whose {BASE_ADAPTERS_FILE} lists this checkpoint "
                             f"(a cycle)")
        if beneath != below:
            raise StageError(f"{listing}: lists {adapter} on top of {below or 'the base model'}, but its "
                             f"{BASE_ADAPTERS_FILE} lists {beneath or 'none'} beneath it (not the same stack)")
        below.append(real)


def require_checkpoint(path: str | Path, flag: str = "--policy_ckpt") -> Path:
    problem = checkpoint_problem(path, flag)
    if problem:
        raise StageError(problem)
    return Path(path)


def require_model_folder(path: str | Path) -> Path:
    """model.path: a model folder with a tokenizer and weights. The tokenizer's presence is checked before
    the weights' headers are read: a folder holding only weights is told what it lacks."""
    problem = None
    if os.path.isdir(path) and not is_adapter(path) and \
            not any(os.path.isfile(Path(path) / name) for name in TOKENIZER_FILES):
        problem = f"model.path {path}: no tokenizer ({', '.join(TOKENIZER_FILES)})"
    problem = problem or checkpoint_problem(path, "model.path")
    if problem is None and is_adapter(path):
        problem = f"model.path {path}: an adapter folder, not a base model"
    if problem:
        raise StageError(problem + ("" if os.path.isdir(path) else " (run download.sh, or check the path)"))
    return Path(path)


class _loading:
    """Turns what transformers / peft raise on a broken folder into one line naming it."""

    # what a broken file raises past checkpoint_problem's checks: a pickled .bin (UnpicklingError, EOFError,
    # IndexError), a tensor of the wrong shape (RuntimeError), a config value of the wrong type (TypeError)
    FAILURES = (OSError, ValueError, LookupError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError,
                SafetensorError)

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, self.FAILURES) and not issubclass(exc_type, StageError):
            why = exc_type.__name__ + (f": {_first_line(exc)}" if str(exc).strip() else "")
            raise StageError(f"{self.path}: could not be loaded ({why})") from None
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
    """The adapters a checkpoint sits on, bottom first (its base_adapters.json; none without one). They are
    recorded as given (relative to the repository root when relative), so run folders stay movable together with
    the repository."""
    listing = Path(ckpt) / BASE_ADAPTERS_FILE
    if not os.path.lexists(listing):
        return []
    data = read_json(listing)
    adapters = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise StageError(f"{listing}: not {{\"adapters\": [folders]}}")
    return [a if os.path.isabs(a) or os.path.exists(a) else str(REPO_ROOT / a) for a in adapters]


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
        write_json_atomic(dest / BASE_ADAPTERS_FILE, {"adapters": adapters})
    return dest


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
