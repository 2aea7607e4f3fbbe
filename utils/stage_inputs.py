"""Where a stage finds its inputs by default: the earlier stages of the same run (docs/design.md)."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from utils.cli import ConfigFlag, upstream_dir
from utils.finqa_data import OFFICIAL_TEST, OFFICIAL_TEST_FILE, check_processed_split, load_processed, read_jsonl
from utils.compute import precision
from utils.models import checkpoint_kind, load_tokenizer, merged_policy_base, require_checkpoint
from utils.reward import RewardCalculator, RewardWeights
from utils.runs import StageError, is_completed, sha256_file
from utils.stages import STAGES

log = logging.getLogger("finqa_rl")


def processed_split(config: dict, split: str) -> Path:
    """A split of the processed set 01 wrote, checked to be whole and built with this config's data settings."""
    folder = Path(config["data"]["processed_dir"])
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        if split == OFFICIAL_TEST:
            raise StageError(f"{path} not found: 01_prepare_dataset.py builds it in the full or retrieved setting "
                             f"(data.context_mode) from a data.raw_dir that holds {OFFICIAL_TEST_FILE}")
        raise StageError(f"{path} not found (run 01_prepare_dataset.py first)")
    return check_processed_split(folder, split, config["data"], sha256_file)


def reward_spec_path(args, config: dict) -> Path | None:
    """--reward_spec, else this run's 02_rewards/reward_spec.yaml, else None (docs/design.md's default weights)."""
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


def reward_calculator(spec: Path | None, replaced: dict | None = None,
                      shuffle_seed: int | None = None) -> RewardCalculator:
    """The reward of `spec` (None: docs/design.md's weights), with the weights in `replaced` (an RL method's
    algorithm.reward_weights, e.g. {partial_program: 0.6}) put in place of the spec's; shuffle_seed: the
    random-reward control (RewardCalculator.for_training)."""
    weights = RewardWeights.from_spec(spec) if spec else RewardWeights()
    if replaced:
        weights = weights.replaced(replaced)
    return RewardCalculator(weights, shuffle_seed)


def sft_checkpoint(args, config: dict) -> Path:
    """--policy_ckpt, else the checkpoint inside this run's 03_sft that algorithm.sft_checkpoint names (null:
    the SFT stage's own, ckpt_sft/best), e.g. an earlier trainer checkpoint, ckpt_sft/checkpoints/checkpoint-50."""
    return require_checkpoint(*_sft_checkpoint_and_source(args, config))


def _sft_checkpoint_and_source(args, config: dict) -> tuple[Path, str]:
    """The folder sft_checkpoint() names, not yet checked, and what named it (the flag or key its errors quote)."""
    if getattr(args, "policy_ckpt", None):
        return Path(args.policy_ckpt), "--policy_ckpt"
    folder = upstream_dir(args, config, "sft")
    if not is_completed(folder):
        raise StageError(f"{folder} is not a completed SFT stage (run 03_sft_train.py first, or pass --policy_ckpt)")
    inside = config.get("algorithm", {}).get("sft_checkpoint")
    if inside is None:
        return folder / STAGES["sft"].checkpoint, "checkpoint"
    return folder / inside, "algorithm.sft_checkpoint"


def sft_adapter(args, config: dict, method: str) -> Path:
    """sft_checkpoint(), which RL and DPO train a new adapter on: it must be a LoRA adapter, since
    utils.models.load_model rebuilds an adapter stack on model.path, not on a merged checkpoint. A model folder
    is refused for what it is before its files are checked (sound weights would not make it usable here)."""
    ckpt, source = _sft_checkpoint_and_source(args, config)
    if checkpoint_kind(ckpt) == "model":
        raise StageError(f"{source} {ckpt}: expected a LoRA adapter folder (adapter_config.json); "
                         f"{method} on a merged model is not supported")
    return require_checkpoint(ckpt, source)


def add_policy_flags(parser) -> None:
    """The flags of every stage that trains from the SFT model (05, 06, 07, 09)."""
    parser.add_argument("--policy_ckpt", default=None, help="starting policy, a LoRA adapter (default: this run's "
                                                            "03_sft/ckpt_sft/best)")
    parser.add_argument("--reward_spec", default=None, help="reward weights (default: this run's 02_rewards)")


@dataclass
class PolicyInputs:
    """What a stage that trains a new adapter on the SFT model starts from."""

    val_rows: list[dict]     # the validation slice (algorithm.n_val_examples)
    checkpoint: Path         # the SFT adapter
    reward_spec: Path | None
    calculator: RewardCalculator
    tokenizer: object
    compute: object          # utils.compute.Precision
    base: object             # the model with the SFT adapter merged (utils.models.merged_policy_base)
    adapters: list           # the adapter stack a saved checkpoint names


REWARD_SHUFFLE_SEED = 7_777  # added to --seed: the control's permutations do not share the sampler's stream


def policy_inputs(args, config: dict, run, device, method: str) -> PolicyInputs:
    """Load what a method stage starts from; `run` (its stage_run) records the inputs and the precision."""
    val_path = processed_split(config, "val")
    checkpoint = sft_adapter(args, config, method)
    spec = reward_spec_path(args, config)
    run.add_input("val", val_path)
    run.add_input("policy", checkpoint)
    if spec:
        run.add_input("reward_spec", spec)
    val_rows = load_processed(val_path, config["algorithm"]["n_val_examples"])
    compute = precision(config, device)
    run.extra["precision"] = compute.record()
    base, adapters = merged_policy_base(config, checkpoint, device, compute.training_weights_dtype)
    control = config["algorithm"].get("reward_control")  # the RL methods' (DPO learns from no reward)
    calculator = reward_calculator(spec, config["algorithm"].get("reward_weights"),
                                   shuffle_seed=args.seed + REWARD_SHUFFLE_SEED if control == "shuffled" else None)
    run.extra["reward_weights"] = calculator.weights.to_spec()
    if control is not None:
        run.extra["reward_control"] = control
    return PolicyInputs(val_rows, checkpoint, spec, calculator, load_tokenizer(config["model"]["path"]),
                        compute, base, adapters)


TRAIN_PROMPT_FLAG = ConfigFlag("--train_prompts", "algorithm.train_prompts", str,
                               "all | mixed: only prompts whose SFT candidates (04) got different rewards")


def rl_train_rows(args, config: dict, run=None) -> list[dict]:
    """The train prompts an RL stage samples from (algorithm.train_prompts, then algorithm.max_train_examples).

    all: train.jsonl. mixed: only the train prompts whose SFT candidates (04_generate_candidates.py's
    scores.jsonl, algorithm.candidate_scores or this run's) got different rewards. A group whose completions all
    get the same reward gives GRPO and RLOO no gradient; when the SFT model solves a few percent of the prompts,
    most groups are like that, so keeping the prompts it sometimes gets right and sometimes wrong spends the
    rollout budget where the reward can teach something (an offline form of DAPO's dynamic sampling).
    `run` (a stage_run) records the files read as inputs."""
    algo = config["algorithm"]
    mode = algo["train_prompts"]  # all | mixed (utils.config.RULES)
    train_path = processed_split(config, "train")
    rows = load_processed(train_path)
    if run is not None:
        run.add_input("train", train_path)
    if mode == "mixed":
        scores_path = candidate_scores_path(args, config)
        if run is not None:
            run.add_input("candidate_scores", scores_path)
        mixed = mixed_reward_ids(scores_path)
        kept = [row for row in rows if row["id"] in mixed]
        if not kept:
            raise StageError(f"{scores_path}: no train prompt of {train_path} has candidates with different "
                             f"rewards (algorithm.train_prompts mixed would leave nothing to train on)")
        log.info("train prompts: %d of %d have SFT candidates with different rewards (%s)", len(kept), len(rows),
                 scores_path)
        rows = kept
    limit = algo["max_train_examples"]
    return rows[:limit] if limit else rows


def candidate_scores_path(args, config: dict) -> Path:
    """algorithm.candidate_scores, else this run's 04_candidates/scores.jsonl."""
    given = config["algorithm"].get("candidate_scores")
    if given:
        path = Path(given)
        if not path.is_file():
            raise StageError(f"algorithm.candidate_scores: file not found: {path}")
        return path
    folder = upstream_dir(args, config, "candidates")
    if not is_completed(folder):
        raise StageError(f"algorithm.train_prompts mixed needs SFT candidates: {folder} is not a completed stage "
                         f"(run 04_generate_candidates.py on the train split first, or set "
                         f"algorithm.candidate_scores)")
    return folder / "scores.jsonl"


def mixed_reward_ids(scores_path: Path) -> set[str]:
    """Ids of the prompts whose candidates in a scores.jsonl (one line per candidate: id, total) got at least
    two different rewards."""
    totals = defaultdict(set)
    for line_no, line in enumerate(read_jsonl(scores_path), 1):
        if "id" not in line or not isinstance(line.get("total"), (int, float)):
            raise StageError(f"{scores_path}: candidate {line_no} lacks an id or a numeric total (expected "
                             f"04_generate_candidates.py's scores.jsonl)")
        totals[line["id"]].add(round(float(line["total"]), 6))
    return {prompt_id for prompt_id, values in totals.items() if len(values) > 1}
