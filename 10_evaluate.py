"""Stage 10: evaluate a checkpoint on test.jsonl with greedy decoding and FinQA's official metrics.

Writes 10_evaluation/<label>/: metrics.json, breakdown.csv (one row per item with its failure reason),
samples/predictions.jsonl, and predictions_official.json in FinQA's leaderboard format. The checkpoint is
--policy_ckpt, or --base for the untrained model, or by default the one the label names in this run (sft ->
03_sft/ckpt_sft/best, grpo -> 06_grpo/ckpt_grpo/final, grpo_dr -> 06_grpo_dr/ckpt_grpo/final: the table is
utils/stages.py). --predictions_jsonl re-scores saved predictions
without loading a model.
"""
from pathlib import Path

from utils import processes, vllm_engine
from utils.cli import ConfigFlag, UsageError, main_guard, resolve_config, setup_logging, stage_dir, stage_parser, \
    upstream_dir
from utils.finqa_data import load_processed, read_jsonl_lines, write_jsonl
from utils.generation import GenerationStats, generate, settings_from_config
from utils.metrics import MAX_TOKEN_COUNT, aggregate, breakdown_frame, is_token_count, official_predictions, \
    official_scores, score_items
from utils.compute import precision
from utils.models import configure_torch, load_model, load_tokenizer, require_checkpoint
from utils.runs import StageError, plain_name, require_completed, stage_run, write_atomic, write_json_atomic
from utils.stage_inputs import processed_split, reward_calculator, reward_spec_path
from utils.stages import STAGES, label_checkpoint

STAGE = STAGES["evaluation"]


def checkpoint_for(args, config) -> Path | None:
    if args.base:
        return None
    if args.policy_ckpt:
        return require_checkpoint(args.policy_ckpt)
    trained = label_checkpoint(args.label)  # the stage a label names (utils/stages.py) and its checkpoint
    if trained is None:
        raise UsageError(f"--label {args.label}: pass --policy_ckpt or --base (no default checkpoint for this label)")
    folder = upstream_dir(args, config, trained.key)
    require_completed(folder, "finish that stage first, or pass --policy_ckpt")
    return require_checkpoint(folder / trained.checkpoint, "checkpoint")


def read_predictions(path: Path, rows: list[dict]) -> list[dict]:
    """Saved predictions ({"id", "completion"}, optional "n_tokens" (null: not counted) and "finish_reason" per
    line), in the order of rows; every row must have one. An id may repeat only on an identical line."""
    by_id, line_of = {}, {}
    for line_no, record in read_jsonl_lines(path):
        where = f"{path}:{line_no}"
        if not isinstance(record.get("id"), str) or not isinstance(record.get("completion"), str):
            raise StageError(f"{where}: each line needs a string 'id' and 'completion'")
        n_tokens = record.get("n_tokens")
        if n_tokens is not None:  # it reaches metrics.json's mean_completion_tokens
            if not is_token_count(n_tokens):
                raise StageError(f"{where}: 'n_tokens' is {n_tokens!r}, not a whole number of tokens "
                                 f"(0 to {MAX_TOKEN_COUNT})")
            record["n_tokens"] = int(n_tokens)
        if record.get("finish_reason") is not None and not isinstance(record["finish_reason"], str):
            raise StageError(f"{where}: 'finish_reason' is {record['finish_reason']!r}, not a string or null")
        known = by_id.get(record["id"])
        if known is not None and known != record:
            raise StageError(f"{where}: prediction id {record['id']!r} again (first on line "
                             f"{line_of[record['id']]}), with other content")
        by_id.setdefault(record["id"], record)
        line_of.setdefault(record["id"], line_no)
    missing = [row["id"] for row in rows if row["id"] not in by_id]
    if missing:
        raise StageError(f"{path}: no prediction for {len(missing)} example(s), e.g. {missing[0]}")
    return [by_id[row["id"]] for row in rows]


FLAGS = (
    ConfigFlag("--split", "evaluation.split", str, "processed split to evaluate on"),
    ConfigFlag("--max_examples", "evaluation.max_examples", int, "evaluate the first N examples only"),
)


def main() -> int:
    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--policy_ckpt", default=None, help="LoRA adapter or merged model folder to evaluate")
    source.add_argument("--base", action="store_true", help="evaluate the untrained base model")
    source.add_argument("--predictions_jsonl", default=None, help="re-score saved predictions (no model)")
    parser.add_argument("--label", default=None, help="sub-folder name: base, sft, ppo, grpo, rloo, dpo, ...")
    parser.add_argument("--reward_spec", default=None, help="reward weights (default: this run's 02_rewards)")
    args = parser.parse_args()
    if args.label is None:
        args.label = "base" if args.base else None
    if not args.label:
        raise UsageError("--label is required (e.g. --label sft)")
    plain_name(args.label, "--label")
    config = resolve_config(args)
    split, limit = config["evaluation"]["split"], config["evaluation"]["max_examples"]
    out_dir = stage_dir(args, config, STAGE.key) / args.label if not args.output_dir else Path(args.output_dir)
    log = setup_logging()

    with stage_run(STAGE.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite, keep_partial=False) as run:
        rows = load_processed(run.add_input(split, processed_split(config, split)), limit)
        spec = reward_spec_path(args, config)
        if spec:
            run.add_input("reward_spec", spec)
        run.extra.update({"label": args.label, "split": split})

        if args.predictions_jsonl:
            predictions = read_predictions(run.add_input("predictions", args.predictions_jsonl), rows)
            run.extra["checkpoint"] = None
        else:
            ckpt = checkpoint_for(args, config)
            if ckpt is not None:
                run.add_input("checkpoint", ckpt)
            run.extra["checkpoint"] = str(ckpt) if ckpt else "base"
            device = configure_torch(config)
            compute = precision(config, device)
            run.extra["precision"] = compute.record()
            prompts, settings = [row["prompt"] for row in rows], settings_from_config(config, sampled=False)
            if config["generation"]["engine"] == "vllm":  # the checkpoint's weights served by vLLM
                stats = vllm_engine.EngineStats()
                generations = vllm_engine.generate_with_vllm(config, ckpt, out_dir / ".vllm_weights", device,
                                                             compute.inference_dtype, prompts, settings, args.seed,
                                                             stats)
                run.metrics["generation"] = vllm_engine.engine_record(stats, len(rows))
            else:
                tokenizer = load_tokenizer(config["model"]["path"])
                model = load_model(config["model"]["path"], ckpt, device, compute.inference_dtype)
                stats = GenerationStats()
                # several processes (utils.processes): each generates its share of the batches, the main one scores
                generations = processes.gather_in_order(generate(
                    model, tokenizer, prompts, settings, desc=f"evaluating {args.label}", seed=args.seed,
                    stats=stats, shard=processes.shard()))
                if not processes.is_main():
                    return 0
                run.metrics["generation"] = {"engine": "native", "seconds": round(stats.seconds, 2),
                                             "tokens": stats.n_generated_tokens,
                                             "tokens_per_second": round(stats.tokens_per_second, 2),
                                             "examples_per_second": round(len(rows) / max(stats.seconds, 1e-9), 3),
                                             "processes": processes.world_size()}  # figures: the main one's share
            predictions = [{"id": row["id"], "completion": group[0].text, "n_tokens": group[0].n_tokens,
                            "finish_reason": group[0].finish_reason} for row, group in zip(rows, generations)]

        records = score_items(rows, predictions, reward_calculator(spec))
        metrics = aggregate(records)
        official = official_predictions(records)
        recheck = official_scores(official, rows)
        if recheck["execution_accuracy"] != metrics["execution_accuracy"] or \
                recheck["program_accuracy"] != metrics["program_accuracy"]:
            raise StageError(f"official-format re-scoring disagrees: {recheck} vs metrics.json "
                             f"{metrics['execution_accuracy']}/{metrics['program_accuracy']}")
        metrics.update({"label": args.label, "split": split, "official_recheck": recheck})

        write_json_atomic(run.add_output("metrics", out_dir / "metrics.json"), metrics)
        frame = breakdown_frame(records)
        write_atomic(run.add_output("breakdown", out_dir / "breakdown.csv"), lambda f: frame.to_csv(f, index=False))
        write_jsonl(run.add_output("predictions", out_dir / "samples" / "predictions.jsonl"), predictions)
        write_json_atomic(run.add_output("predictions_official", out_dir / "predictions_official.json"), official)
        run.metrics.update({k: v for k, v in metrics.items() if k not in ("official_recheck",)})
        log.info("%s on %s (%d): exec acc %.3f, prog acc %.3f, format %.3f, mean reward %.3f", args.label, split,
                 metrics["n_examples"], metrics["execution_accuracy"], metrics["program_accuracy"],
                 metrics["format_compliance"], metrics["mean_reward"])
    return 0


if __name__ == "__main__":
    main_guard(main)
