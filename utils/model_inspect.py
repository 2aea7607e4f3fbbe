"""Looking inside a model architecture without loading weights: which Linear layers LoRA should target, how
big the model is, and what settings suit that size. Used by scripts/add_model_config.py."""

from __future__ import annotations

import re
from collections import OrderedDict

# Leaf names that are never LoRA targets: output heads, value heads, MoE routers, embeddings.
_EXCLUDED_NAMES = {"lm_head", "score", "classifier", "v_head", "summary", "embed_out", "output_layer",
                   "qa_outputs", "pooler", "router", "gate"}
_REPEATED_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a path through a ModuleList: layers.0.self_attn.q_proj


def _linear_types() -> tuple[type, ...]:
    import torch.nn as nn

    types: list[type] = [nn.Linear]
    try:  # GPT-2 style models use transformers' Conv1D for their projections
        from transformers.pytorch_utils import Conv1D
        types.append(Conv1D)
    except ImportError:
        pass
    return tuple(types)


def linear_layer_names(model) -> list[str]:
    """Full names of every Linear (or GPT-2 Conv1D) module, in registration order."""
    types = _linear_types()
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def find_lora_targets(model) -> list[str]:
    """LoRA target_modules for `model`: the distinct leaf names of the Linear layers inside its repeated
    transformer blocks (attention and MLP projections), in the order they appear.

    Excluded: the LM head and other output/score heads, embeddings, MoE routers, and any Linear outside the
    repeated blocks. For Llama / Qwen2 / Mistral this gives
    [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]."""
    targets: "OrderedDict[str, None]" = OrderedDict()
    for full_name in linear_layer_names(model):
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in _EXCLUDED_NAMES or "embed" in leaf or "head" in leaf:
            continue
        if not _REPEATED_BLOCK.search(full_name):
            continue
        targets[leaf] = None
    return list(targets)


def build_empty_model(config):
    """The model for `config` with every tensor on the meta device: no memory, no weights, instant."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError):
            return AutoModel.from_config(config)


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def describe_model(config, model=None) -> dict:
    """Sizes of the architecture in `config`, and settings that suit it.

    Returns architecture, hidden_size, num_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, vocab_size, max_position_embeddings, tie_word_embeddings, n_params (exact, counted on
    a meta-device instance; `model` may pass one already built) and `suggested`: dtype, torch_threads, batch
    sizes, learning rate, sequence lengths, gradient checkpointing and bf16, chosen by parameter count."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if model is None:
        model = build_empty_model(config)
    seen, n_params = set(), 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    info = {
        "architecture": config.model_type,
        "hidden_size": _first(text, "hidden_size", "n_embd", "d_model"),
        "num_layers": _first(text, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": _first(text, "num_attention_heads", "n_head"),
        "num_key_value_heads": _first(text, "num_key_value_heads", "num_attention_heads", "n_head"),
        "intermediate_size": _first(text, "intermediate_size", "n_inner", "ffn_dim"),
        "vocab_size": _first(text, "vocab_size"),
        "max_position_embeddings": _first(text, "max_position_embeddings", "n_positions", "max_seq_len"),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "n_params": int(n_params),
    }
    info["suggested"] = suggest_settings(info["n_params"], info["max_position_embeddings"])
    return info


def suggest_settings(n_params: int, max_positions: int | None = None) -> dict:
    """Per-model compute settings by size. Up to ~300M: the CPU-friendly defaults of smollm2-135m.yaml;
    bigger models are meant for a GPU (bfloat16 above 1B, smaller batches and learning rates as they grow)."""
    b = n_params / 1e9
    if b <= 0.3:
        s = dict(dtype="auto", torch_threads=2, batch_size=4, gradient_accumulation_steps=2,
                 learning_rate=2.0e-4, max_prompt_tokens=640, max_seq_length=768,
                 gradient_checkpointing=False, gen_batch_size=16)
    elif b <= 1.0:
        s = dict(dtype="auto", torch_threads=0, batch_size=8, gradient_accumulation_steps=2,
                 learning_rate=1.0e-4, max_prompt_tokens=1024, max_seq_length=1152,
                 gradient_checkpointing=False, gen_batch_size=32)
    elif b <= 4.0:
        s = dict(dtype="auto", torch_threads=0, batch_size=8, gradient_accumulation_steps=2,
                 learning_rate=1.0e-4, max_prompt_tokens=1024, max_seq_length=1152,
                 gradient_checkpointing=False, gen_batch_size=32)
    else:
        s = dict(dtype="auto", torch_threads=0, batch_size=2, gradient_accumulation_steps=8,
                 learning_rate=5.0e-5, max_prompt_tokens=1024, max_seq_length=1152,
                 gradient_checkpointing=True, gen_batch_size=16)
    s.update(lora_r=16, lora_alpha=32, lora_dropout=0.05, max_new_tokens=96)
    if max_positions:  # leave room for the answer inside the context window
        s["max_seq_length"] = min(s["max_seq_length"], int(max_positions))
        s["max_prompt_tokens"] = max(64, min(s["max_prompt_tokens"], s["max_seq_length"] - s["max_new_tokens"] - 32))
    return s


def format_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
