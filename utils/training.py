"""Settings every trl trainer of the project shares (SFT, GRPO, RLOO, DPO).

trl's configs default to bf16 and gradient checkpointing; both come from the model config instead (off on a
CPU, where bf16 matmuls are very slow and memory is not the limit).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


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
        "bf16": training["bf16"] and not on_cpu,
        "gradient_checkpointing": training["gradient_checkpointing"],
        "report_to": ["tensorboard"] if tensorboard else [],
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": on_cpu,
        **method_args,
    }
