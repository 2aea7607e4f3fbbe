"""Settings every trl trainer of the project shares (SFT, GRPO, RLOO, DPO).

trl's configs default to bf16 and gradient checkpointing; both come from the model config instead: bf16 (autocast,
float32 master weights and optimizer state) where utils.compute chose bfloat16 for the device, on a CPU too, and
gradient checkpointing from training.gradient_checkpointing.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.compute import precision


def trainer_arguments(config: dict, out_dir: Path, seed: int, device: torch.device, tensorboard: bool = False,
                      **method_args) -> dict:
    """Keyword arguments for a trl *Config: the model's compute settings, logging and seeds, then the method's."""
    training = config["training"]
    if tensorboard:
        # transformers 5 takes the TensorBoard folder from the environment, not from the arguments
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "logs" / "tensorboard")
    on_cpu = device.type == "cpu"
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
        **method_args,
    }
