"""Stage 09: DPO (trl's DPOTrainer) on 08's preference pairs, starting from the SFT model.

A new LoRA adapter trains on the SFT model with its adapter merged (utils.models.merged_policy_base); the
reference policy is that model with the new adapter disabled, i.e. the SFT model. beta, loss_type and the
schedule come from configs/algorithms/dpo.yaml. Preference accuracy on heldout_pairs.jsonl (prompts never trained
on) is measured before and after training (utils.preferences.preference_accuracy: logp_accuracy, the fraction of
pairs where the policy gives the chosen response a higher log-probability than the rejected one, is the
before/after headline; implicit_reward_accuracy, the fraction with a positive DPO reward margin
beta * (log pi/ref(chosen) - log pi/ref(rejected)), is 0 before by construction). Writes ckpt_dpo/{best,final}/
(LoRA adapter on the SFT stack; best by val reward, the SFT start included), logs/training_log.json (loss,
rewards/*, logps/*, and eval_* on the held-out pairs), val_generations/step_N.json (greedy validation every
algorithm.eval_every_steps, step 0 = the SFT model) and preference_eval.json (per held-out pair log-probs).
--resume continues an interrupted run from its last trainer checkpoint (every algorithm.save_every_steps).
"""
import time
from pathlib import Path

import utils  # noqa: F401  (first: sets the threading environment before torch loads)
from trl import DPOConfig, DPOTrainer

from utils import processes
from utils.cli import ConfigFlag, UsageError, check_resume, main_guard, resolve_config, setup_logging, stage_dir, \
    stage_parser, upstream_dir
from utils.finqa_data import hf_dataset, read_jsonl
from utils.generation import settings_from_config
from utils.models import MergedCopy, configure_torch, count_parameters, lora_config
from utils.preferences import pair_logps, preference_accuracy
from utils.runs import StageError, require_completed, stage_run, write_json_atomic
from utils.stage_inputs import add_policy_flags, policy_inputs
from utils.training import SCHEDULE_KEYS, trainer_arguments
from utils.validation import JsonLogCallback, PolicyCheckpoints, first_logged, last_logged
from utils.stages import STAGES

STAGE = STAGES["dpo"]

FLAGS = (
    ConfigFlag("--beta", "algorithm.beta", float, "DPO beta (implicit KL strength)"),
    ConfigFlag("--loss_type", "algorithm.loss_type", str, "trl loss type(s), comma-separated (sigmoid, ipo, ...)"),
    ConfigFlag("--learning_rate", "algorithm.learning_rate", float, "peak learning rate"),
    ConfigFlag("--max_steps", "algorithm.max_steps", int, "stop after this many optimizer steps (-1: epochs)"),
    ConfigFlag("--epochs", "algorithm.epochs", float, "passes over pairs.jsonl"),
)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # trl 1.16's DPOConfig
LOGGED_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def preference_pairs(args, config, run) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, held-out pairs, 08's manifest) from --prefs_dir or this run's 08_preferences."""
    folder = Path(args.prefs_dir) if args.prefs_dir else upstream_dir(args, config, "preferences")
    manifest = require_completed(folder, "run 08_build_prefs.py first, or pass --prefs_dir")
    train = read_jsonl(run.add_input("pairs", folder / "pairs.jsonl"))
    heldout_path = folder / "heldout_pairs.jsonl"
    heldout = read_jsonl(run.add_input("heldout_pairs", heldout_path)) if heldout_path.is_file() else []
    return train, heldout, manifest


def main() -> int:
    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    add_policy_flags(parser)
    parser.add_argument("--prefs_dir", default=None, help="a completed 08_preferences folder (default: this run's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last trainer "
                                                              "checkpoint (every algorithm.save_every_steps)")
    args = parser.parse_args()
    config = resolve_config(args)
    algo, training = config["algorithm"], config["training"]
    loss_types = [t.strip() for t in str(algo["loss_type"]).split(",") if t.strip()]
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown or not loss_types:
        raise UsageError(f"--loss_type: unknown {', '.join(unknown) or '(empty)'} (expected {', '.join(LOSS_TYPES)})")
    if algo["loss_weights"] is not None and len(algo["loss_weights"]) != len(loss_types):
        raise UsageError(f"algorithm.loss_weights has {len(algo['loss_weights'])} weights for {len(loss_types)} "
                         f"loss types")
    max_length = algo["max_length"] or training["max_seq_length"]
    out_dir = stage_dir(args, config, STAGE.key)
    check_resume(args, out_dir)
    log = setup_logging()
    device = configure_torch(config)

    with stage_run(STAGE.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=args.resume) as run:
        started = time.time()
        train_pairs, heldout_pairs, prefs_manifest = preference_pairs(args, config, run)
        if algo["max_train_pairs"]:
            train_pairs = train_pairs[: algo["max_train_pairs"]]
        if not train_pairs:
            raise StageError("pairs.jsonl holds no pairs (see 08_preferences/stats.txt for why)")
        if algo["preference_eval_max_pairs"]:
            heldout_pairs = heldout_pairs[: algo["preference_eval_max_pairs"]]
        policy = policy_inputs(args, config, run, device, "DPO")
        tokenizer = policy.tokenizer
        checkpoints = PolicyCheckpoints(out_dir, STAGE.key, tokenizer, policy.adapters)
        resume_from = checkpoints.resume_point(args.resume)
        validation = checkpoints.validation(policy.val_rows, policy.calculator,
                                            settings_from_config(config, sampled=False), algo["eval_every_steps"],
                                            args.seed, resume_from=resume_from)
        if resume_from:
            log.info("resuming from %s", resume_from)
        eval_pairs = bool(heldout_pairs) and algo["eval_pairs_every_steps"] > 0
        dpo_config = DPOConfig(**trainer_arguments(
            config, out_dir, args.seed, device, DPOConfig,
            algorithm_keys=SCHEDULE_KEYS + ("learning_rate", "beta", "loss_weights", "save_every_steps",
                                            "save_total_limit"),
            output_dir=str(checkpoints.trainer_dir),
            max_length=max_length,
            loss_type=loss_types,
            save_strategy="steps",  # trainer checkpoints every save_every_steps, for --resume
            eval_strategy="steps" if eval_pairs else "no",
            eval_steps=algo["eval_pairs_every_steps"] if eval_pairs else None,
            per_device_eval_batch_size=training["batch_size"],
            prediction_loss_only=True,  # DPO's eval metrics come from the loss; logits would cost a forward pass
        ))
        columns = ["prompt", "chosen", "rejected"]
        trainer = DPOTrainer(model=policy.base, args=dpo_config, processing_class=tokenizer,
                             train_dataset=hf_dataset(train_pairs, columns),
                             eval_dataset=hf_dataset(heldout_pairs, columns) if eval_pairs else None,
                             peft_config=lora_config(config),
                             callbacks=[JsonLogCallback(checkpoints.log_path), validation])
        validation.generation_model = MergedCopy(trainer.model).model  # validation decodes the adapter merged

        # Before training the new adapter is zero: the policy is the reference (the SFT model). The held-out pairs
        # are scored by the main process only (utils.processes).
        batch = algo["preference_eval_batch_size"]
        scored_pairs = heldout_pairs if processes.is_main() else []
        reference = pair_logps(trainer.model, tokenizer, scored_pairs, max_length, batch, reference=True)
        before = preference_accuracy(scored_pairs, reference, reference, algo["beta"])
        log.info("held-out preference accuracy before DPO (SFT): %s on %d pairs", before["logp_accuracy"],
                 before["n_pairs"])
        if not resume_from:
            validation.run(trainer.model, 0)

        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if not processes.is_main():
            return 0

        policy = pair_logps(trainer.model, tokenizer, heldout_pairs, max_length, batch)
        after = preference_accuracy(heldout_pairs, policy, reference, algo["beta"])
        log.info("held-out preference accuracy after DPO: %s (implicit reward accuracy %s)", after["logp_accuracy"],
                 after["implicit_reward_accuracy"])
        write_json_atomic(run.add_output("preference_eval", out_dir / "preference_eval.json"), {
            "beta": algo["beta"], "before": before, "after": after,
            "pairs": [{"id": pair["id"], "chosen_reward": pair["chosen_reward"],
                       "rejected_reward": pair["rejected_reward"], "chosen_source": pair.get("chosen_source"),
                       "reference": ref, "policy": pol}
                      for pair, ref, pol in zip(heldout_pairs, reference, policy)],
        })

        figures = checkpoints.finish(run, trainer.model, validation)

        history, val = trainer.state.log_history, validation.history
        run.metrics.update({
            "n_train_pairs": len(train_pairs), "n_train_pairs_used": len(trainer.train_dataset),
            "n_train_prompts": len({p["id"] for p in train_pairs}),
            "n_heldout_pairs": len(heldout_pairs), "n_heldout_prompts": len({p["id"] for p in heldout_pairs}),
            "add_gold_when_no_correct": prefs_manifest.get("metrics", {}).get("add_gold_when_no_correct"),
            "beta": algo["beta"], "loss_type": loss_types,
            "steps": trainer.state.global_step, "epochs_done": trainer.state.epoch,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "train_tokens": last_logged(history, "num_tokens"),  # prompt + chosen + rejected tokens seen
            "first_loss": first_logged(history, "loss"),
            "final_loss": last_logged(history, "loss"),
            "final_train": {key: last_logged(history, key) for key in LOGGED_KEYS[1:]},
            "final_eval": {key: last_logged(history, f"eval_{key}") for key in LOGGED_KEYS},
            "preference_accuracy_before": before["logp_accuracy"],
            "preference_accuracy_after": after["logp_accuracy"],
            "implicit_reward_accuracy_after": after["implicit_reward_accuracy"],
            "preference_accuracy": {
                "before": before, "after": after,
                "definition": "logp_accuracy: fraction of held-out pairs with log pi(chosen) > log pi(rejected) "
                              "(summed over response tokens), pi = SFT before and DPO after; "
                              "implicit_reward_accuracy: fraction with beta*((log pi(c) - log ref(c)) - "
                              "(log pi(r) - log ref(r))) > 0, ref = SFT (0 before: pi == ref)"},
            **figures,
            "wall_time_s": round(time.time() - started, 1),
            "parameters": count_parameters(trainer.model),
            "processes": processes.world_size(),
        })
        if not heldout_pairs:
            log.warning("no held-out pairs: preference accuracy not measured (08 heldout_fraction is 0, or too "
                        "few prompts had pairs)")
        log.info("DPO done: %d steps, final loss %s, val parse rate %.2f -> %.2f, held-out preference accuracy "
                 "%s -> %s", trainer.state.global_step, run.metrics["final_loss"], val[0]["parse_rate"],
                 val[-1]["parse_rate"], before["logp_accuracy"], after["logp_accuracy"])
    return 0


if __name__ == "__main__":
    main_guard(main)
