"""Where a stage finds its inputs by default: the earlier stages of the same run (DESIGN.md)."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.cli import upstream_dir
from utils.models import is_adapter
from utils.reward import RewardCalculator, RewardWeights
from utils.runs import StageError, is_completed

log = logging.getLogger("finqa_rl")


def processed_split(config: dict, split: str) -> Path:
    path = Path(config["data"]["processed_dir"]) / f"{split}.jsonl"
    if not path.is_file():
        raise StageError(f"{path} not found (run 01_prepare_dataset.py first)")
    return path


def reward_spec_path(args, config: dict) -> Path | None:
    """--reward_spec, else this run's 02_rewards/reward_spec.yaml, else None (DESIGN.md's default weights)."""
    if getattr(args, "reward_spec", None):
        path = Path(args.reward_spec)
        if not path.is_file():
            raise StageError(f"--reward_spec: file not found: {path}")
        return path
    folder = upstream_dir(args, config, "rewards")
    if is_completed(folder):
        return folder / "reward_spec.yaml"
    log.warning("no completed %s in this run: using the default reward weights", folder)
    return None


def reward_calculator(spec: Path | None) -> RewardCalculator:
    return RewardCalculator(RewardWeights.from_spec(spec) if spec else RewardWeights())


def sft_checkpoint(args, config: dict) -> Path:
    """--policy_ckpt, else this run's 03_sft/ckpt_sft/best."""
    if getattr(args, "policy_ckpt", None):
        path = Path(args.policy_ckpt)
        if not path.is_dir():
            raise StageError(f"--policy_ckpt: folder not found: {path}")
        return path
    folder = upstream_dir(args, config, "sft")
    if not is_completed(folder):
        raise StageError(f"{folder} is not a completed SFT stage (run 03_sft_train.py first, or pass --policy_ckpt)")
    return folder / "ckpt_sft" / "best"


def sft_adapter(args, config: dict, method: str) -> Path:
    """sft_checkpoint(), which RL and DPO train a new adapter on: it must be a LoRA adapter, since
    utils.models.load_model rebuilds an adapter stack on model.path, not on a merged checkpoint."""
    ckpt = sft_checkpoint(args, config)
    if not is_adapter(ckpt):
        raise StageError(f"--policy_ckpt {ckpt}: expected a LoRA adapter folder (adapter_config.json); "
                         f"{method} on a merged model is not supported")
    return ckpt
