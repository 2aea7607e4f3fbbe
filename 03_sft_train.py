"""Stage 03: supervised fine-tuning with LoRA (trl's SFTTrainer), loss on the completion only.

Trains on train.jsonl in the model's chat template; every algorithm.eval_every_steps it generates on a slice of
val.jsonl, scores it with the reward calculator (valid_samples/step_N.json) and keeps ckpt_sft/best by val
reward; ckpt_sft/final is the last step. --resume continues an interrupted run from its last checkpoint.
"""
import utils  # noqa: F401  (first: sets the threading environment before torch loads)
from trl import SFTConfig, SFTTrainer

from utils import processes
from utils.cli import ConfigFlag, check_resume, main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.finqa_data import hf_dataset, load_processed
from utils.generation import settings_from_config
from utils.compute import precision
from utils.models import MergedCopy, configure_torch, count_parameters, load_model, load_tokenizer, lora_config
from utils.runs import stage_run
from utils.stage_inputs import processed_split, reward_calculator, reward_spec_path
from utils.training import SCHEDULE_KEYS, last_checkpoint, trainer_arguments
from utils.validation import JsonLogCallback, PolicyCheckpoints
from utils.stages import STAGES

STAGE = STAGES["sft"]

FLAGS = (
    ConfigFlag("--batch_size", "training.batch_size", int, "per-device batch size"),
    ConfigFlag("--epochs", "algorithm.epochs", float, "passes over the training data"),
    ConfigFlag("--learning_rate", "training.learning_rate", float, "peak learning rate"),
    ConfigFlag("--max_steps", "algorithm.max_steps", int, "stop after this many optimizer steps (-1: epochs)"),
)


def main() -> int:
    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    parser.add_argument("--skip_validation", action="store_true", help="no generation during training "
                                                                      "(ckpt_sft/best is then the final model)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--reward_spec", default=None, help="reward weights (default: this run's 02_rewards)")
    args = parser.parse_args()
    config = resolve_config(args)
    algo, training = config["algorithm"], config["training"]
    out_dir = stage_dir(args, config, STAGE.key)
    check_resume(args, out_dir)
    log = setup_logging()
    device = configure_torch(config)

    with stage_run(STAGE.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=args.resume) as run:
        train_rows = load_processed(run.add_input("train", processed_split(config, "train")),
                                    algo["max_train_examples"])
        val_rows = load_processed(run.add_input("val", processed_split(config, "val")), algo["n_val_examples"])
        spec = reward_spec_path(args, config)
        if spec:
            run.add_input("reward_spec", spec)
        tokenizer = load_tokenizer(config["model"]["path"])
        compute = precision(config, device)
        run.extra["precision"] = compute.record()
        model = load_model(config["model"]["path"], device=device, dtype=compute.training_weights_dtype)

        checkpoints = PolicyCheckpoints(out_dir, STAGE.key, tokenizer, adapters=[], val_folder="valid_samples")
        trainer_dir = checkpoints.ckpt_dir / "checkpoints"
        callbacks = [JsonLogCallback(checkpoints.log_path)]
        validation = None
        if not args.skip_validation:
            validation = checkpoints.validation(val_rows, reward_calculator(spec),
                                                settings_from_config(config, sampled=False), algo["eval_every_steps"],
                                                args.seed, best_reward=checkpoints.best_reward_saved() if args.resume
                                                else None)
            callbacks.append(validation)

        sft_config = SFTConfig(**trainer_arguments(
            config, out_dir, args.seed, device, SFTConfig,
            algorithm_keys=SCHEDULE_KEYS + ("save_every_steps", "save_total_limit"),
            output_dir=str(trainer_dir),
            max_length=training["max_seq_length"],
            completion_only_loss=True,
            save_strategy="steps",
            include_num_input_tokens_seen=True,
        ))
        trainer = SFTTrainer(model=model, args=sft_config, processing_class=tokenizer,
                             train_dataset=hf_dataset(train_rows, ["prompt", "completion"]),
                             peft_config=lora_config(config), callbacks=callbacks)
        if validation is not None:  # generates from a merged copy of the adapter (utils.models.MergedCopy)
            validation.generation_model = MergedCopy(trainer.model).model
        resume_from = last_checkpoint(trainer_dir) if args.resume else None
        if args.resume:
            log.info("resuming from %s", resume_from or "the start (no checkpoint yet)")
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if not processes.is_main():  # several processes (utils.processes): the main one saves and reports
            return 0

        checkpoints.finish(run, trainer.model, validation)
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        run.metrics.update({
            "train_examples": len(train_rows), "steps": trainer.state.global_step,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "parameters": count_parameters(trainer.model),
            "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
            "processes": processes.world_size(),
        })
        if validation is not None:  # SFT validates from its first eval step on, so no start figure; a resumed
            # run's best may be from before the interruption
            run.metrics.update({"validation": validation.history, "best_val_reward": validation.best_reward})
        log.info("SFT done: %d steps, final loss %s", trainer.state.global_step, run.metrics["final_loss"])
    return 0


if __name__ == "__main__":
    main_guard(main)
