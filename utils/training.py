"""Settings every trl trainer of the project shares (SFT, GRPO, RLOO, DPO), and the one way an algorithm YAML
becomes a trl *Config's arguments.

trl's configs default to bf16 and gradient checkpointing; both come from the model config instead: bf16 (autocast,
float32 master weights and optimizer state) where utils.compute chose bfloat16 for the device, on a CPU too, and
gradient checkpointing from training.gradient_checkpointing.

trl's fused LM head (SFT, GRPO, RLOO and DPO score tokens through it) projects only the labelled positions through
the vocabulary on CUDA, but every position elsewhere; on a CPU that is the prompt too, most of each sequence here.
trainer_arguments makes it score the labelled positions on a CPU as well (score_labelled_positions_only).

A stage names the algorithm keys it hands to trl (`algorithm_keys`); a key is passed under its own name unless
TRL_NAMES renames it, its value always comes from the YAML (defaults live there only), and a name the trl config
does not take is an error naming the key, not a TypeError from inside trl.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from utils.compute import precision
from utils.config import ConfigError

# algorithm keys whose trl argument has another name
TRL_NAMES = {
    "epochs": "num_train_epochs",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float < 1 is a ratio of the steps
    "save_every_steps": "save_steps",
}
# the schedule keys of every epoch-based trl stage (SFT, DPO)
SCHEDULE_KEYS = ("epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm",
                 "logging_steps")


def checkpoint_step(checkpoint: Path) -> int:
    """The step a trainer checkpoint (checkpoint-<step>) was saved after."""
    return int(Path(checkpoint).name.split("-")[-1])


def last_checkpoint(folder: Path) -> Path | None:
    """The newest trainer checkpoint (checkpoint-<step>) in folder, or None."""
    checkpoints = sorted(Path(folder).glob("checkpoint-*"), key=checkpoint_step)
    return checkpoints[-1] if checkpoints else None


def algorithm_arguments(config_class, algo: dict, keys) -> dict:
    """trl arguments for config_class from the algorithm keys `keys` of the resolved config."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    arguments = {}
    for key in keys:
        name = TRL_NAMES.get(key, key)
        if key not in algo:
            raise ConfigError(f"algorithm.{key}: missing from the algorithm config ({config_class.__name__} needs it)")
        if name not in fields:
            raise ConfigError(f"algorithm.{key}: trl's {config_class.__name__} has no argument {name!r}")
        arguments[name] = algo[key]
    return arguments


def score_labelled_positions_only(on_cpu: bool = True) -> None:
    """Make trl's fused LM head score only the positions with a label on a CPU, as it does on CUDA (False: trl's
    own rule back). trl decides with `compact = _use_triton(device)`: scoring every position keeps tile shapes
    fixed for compiled backends (its comment names Neuron), which eager CPU code does not need; there, the prompt
    positions (labels -100, ~90% of an SFT or RL sequence here) cost a 49k-vocabulary projection and a float32
    softmax each, forward and backward, for a zero. The loss and gradients are the same (tests/test_compute.py)."""
    import trl.trainer.utils as trl_utils
    try:
        from trl.kernels.chunked_logprob import _use_triton as trls_rule
    except ImportError:  # a trl without this seam: leave it as it is
        return
    if not hasattr(trl_utils, "_use_triton"):
        return
    trl_utils._use_triton = (lambda device: device.type == "cpu" or trls_rule(device)) if on_cpu else trls_rule


def trainer_arguments(config: dict, out_dir: Path, seed: int, device: torch.device, config_class=None,
                      algorithm_keys=(), **method_args) -> dict:
    """Keyword arguments for a trl *Config: the model's compute settings, logging and seeds, the algorithm keys
    the stage hands over (see algorithm_arguments), then the stage's own computed arguments, which win."""
    training, algo = config["training"], config.get("algorithm") or {}
    tensorboard = bool(algo.get("tensorboard"))
    if tensorboard:
        # transformers 5 takes the TensorBoard folder from the environment, not from the arguments
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "logs" / "tensorboard")
    on_cpu = device.type == "cpu"
    if on_cpu:
        score_labelled_positions_only()
    from_yaml = algorithm_arguments(config_class, algo, algorithm_keys) if config_class is not None else {}
    return {
        "per_device_train_batch_size": training["batch_size"],
        "gradient_accumulation_steps": training["gradient_accumulation_steps"],
        "learning_rate": training["learning_rate"],
        "bf16": precision(config, device).dtype == "bfloat16",
        "fp16": precision(config, device).dtype == "float16",
        "gradient_checkpointing": training["gradient_checkpointing"],
        "report_to": ["tensorboard"] if tensorboard else [],
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": on_cpu,
        **from_yaml,
        **method_args,
    }
