"""Stage 05: PPO with a value head (utils/ppo.py) on the rule-based reward, starting from the SFT model.

A new LoRA adapter trains on the SFT model (its adapter merged); the reference policy is the same model with the
new adapter off. Each step samples one completion for each of algorithm.rollout_batch_size train prompts,
scores them with the reward calculator, and runs algorithm.ppo_epochs of clipped PPO updates on them.
Writes ckpt_ppo/{final,best}/ (LoRA adapter on the SFT stack, value_head.pt; best by val reward, the SFT start
included), logs/training_log.json (statistics per step) and val_generations/step_N.json (greedy validation
every algorithm.eval_every_steps, step 0 = the SFT model). Runs under `accelerate launch` as well (DDP; DeepSpeed
is refused: utils.ppo.refuse_deepspeed). Every algorithm.save_every_steps it writes a resumable checkpoint
(ckpt_ppo/checkpoints/checkpoint-<step>: PPOTrainer.save_state); --resume continues an interrupted run from it.
"""
import utils  # noqa: F401  (first: sets the threading environment before torch loads)

import logging
import shutil
import time

import torch
from tqdm.auto import tqdm

from utils.cli import ConfigFlag, check_resume, main_guard, resolve_config, setup_logging, stage_dir, stage_parser
from utils.generation import settings_from_config
from utils.models import configure_torch, count_parameters, lora_config
from utils.ppo import PPOSettings, PPOTrainer, cycle_batches, refuse_deepspeed, save_value_head
from utils.runs import read_json, stage_run, write_json_atomic
from utils.stage_inputs import TRAIN_PROMPT_FLAG, add_policy_flags, policy_inputs, rl_train_rows
from utils.validation import PolicyCheckpoints, logged_upto
from utils.stages import STAGES

STAGE = STAGES["ppo"]

FLAGS = (
    ConfigFlag("--steps", "algorithm.steps", int, "PPO updates (one rollout batch each)"),
    ConfigFlag("--learning_rate", "algorithm.learning_rate", float, "AdamW learning rate (LoRA and value head)"),
    ConfigFlag("--kl_coef", "algorithm.kl_coef", float, "per-token KL penalty coefficient (initial, if adaptive)"),
    ConfigFlag("--clip_range", "algorithm.clip_range", float, "policy ratio clip range"),
    ConfigFlag("--ppo_epochs", "algorithm.ppo_epochs", int, "passes over each rollout"),
    TRAIN_PROMPT_FLAG,
)


def main() -> int:
    from accelerate import Accelerator
    from peft import get_peft_model

    parser = stage_parser(__doc__, STAGE, config_flags=FLAGS)
    add_policy_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint "
                                                              "(every algorithm.save_every_steps)")
    args = parser.parse_args()
    refuse_deepspeed()  # before the config, model or accelerator (which would need the deepspeed package)
    config = resolve_config(args)
    settings = PPOSettings.from_config(config["algorithm"])
    log = setup_logging()
    configure_torch(config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main = accelerator.is_main_process
    if not is_main:
        log.setLevel(logging.WARNING)  # one process reports progress
    out_dir = stage_dir(args, config, STAGE.key)
    check_resume(args, out_dir)

    # under several processes only the main one writes (utils.processes)
    with stage_run(STAGE.manifest_name, out_dir, config, args.seed, overwrite=args.overwrite,
                   keep_partial=args.resume) as run:
        train_rows = rl_train_rows(args, config, run)
        torch.manual_seed(args.seed)
        inputs = policy_inputs(args, config, run, accelerator.device, "PPO")
        tokenizer, calculator, compute = inputs.tokenizer, inputs.calculator, inputs.compute
        policy = get_peft_model(inputs.base, lora_config(config))
        rollout_settings = settings_from_config(config, sampled=True, max_new_tokens=settings.max_new_tokens,
                                                temperature=settings.temperature, top_p=settings.top_p)
        trainer = PPOTrainer(policy, tokenizer, calculator, settings, rollout_settings, accelerator, args.seed,
                             compute.torch_dtype)
        greedy = settings_from_config(config, sampled=False)
        next_batch = cycle_batches(train_rows, settings.rollout_batch_size, args.seed + accelerator.process_index)

        # the same checkpoints and validation as the trl stages, the value head saved beside each adapter
        checkpoints = PolicyCheckpoints(out_dir, STAGE.key, tokenizer, inputs.adapters,
                                        save_extra=lambda model, dest: save_value_head(trainer.unwrapped, dest))
        resume_from = checkpoints.resume_point(args.resume)
        validator = checkpoints.validation(inputs.val_rows, calculator, greedy, settings.eval_every_steps, args.seed,
                                           resume_from=resume_from)
        validator.generation_model = trainer.generation_model
        log_path = checkpoints.log_path

        started = time.time()
        records: list[dict] = []
        if resume_from:  # continue where the interrupted run's last checkpoint stands
            done = trainer.load_state(resume_from)
            for _ in range(done):
                next_batch()  # the prompt stream as it stood
            records = logged_upto(read_json(log_path, "training log"), done)
            log.info("resuming from %s (step %d)", resume_from, done)
        else:
            done = 0
            validator.run(trainer.policy, 0)  # the SFT starting point (the new adapter is still zero)
        bar = tqdm(range(done + 1, settings.steps + 1), desc="PPO", unit="step", disable=not is_main)
        for step in bar:
            stats = {"step": step, **trainer.step(next_batch())}
            records.append(stats)
            if is_main:
                write_json_atomic(log_path, records)
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.3f}")
            log.info("step %d: reward %.3f, kl %.3f, policy loss %.4f, value loss %.4f, %.1fs", step,
                     stats["reward_mean"], stats["kl"], stats["policy_loss"], stats["value_loss"],
                     stats["time_step_s"])
            if step == settings.steps or (settings.eval_every_steps > 0 and step % settings.eval_every_steps == 0):
                validator.run(trainer.policy, step)
            if step < settings.steps and step % settings.save_every_steps == 0:  # after validating: its state too
                trainer.save_state(checkpoints.trainer_dir / f"checkpoint-{step}")
                for older in checkpoints.trainer_dir.glob("checkpoint-*"):  # the newest is all a resume needs
                    if older.name != f"checkpoint-{step}" and is_main:
                        shutil.rmtree(older)

        if is_main:
            figures = checkpoints.finish(run, trainer.policy, validator)
            history = validator.history
            per_step = records[-1]
            run.metrics.update({
                "steps": settings.steps,
                **figures,
                "final_kl": per_step["kl"], "final_kl_coef": trainer.kl_controller.value,
                "first_train_reward": records[0]["reward_mean"], "final_train_reward": per_step["reward_mean"],
                "prompts_per_step": per_step["n_prompts"], "completions_per_step": per_step["n_completions"],
                "total_completions": sum(r["n_completions"] for r in records),
                "total_generated_tokens": sum(r["n_generated_tokens"] for r in records),
                "train_prompts": settings.train_prompts, "train_examples": len(train_rows),
                "processes": accelerator.num_processes,
                "seconds": {key: round(sum(r[f"time_{key}_s"] for r in records), 1)
                            for key in ("generation", "reward", "training")},
                "wall_time_s": round(time.time() - started, 1),
                "parameters": count_parameters(trainer.unwrapped),
            })
            log.info("PPO done: %d steps, val reward %.3f -> %.3f, final kl %.3f", settings.steps,
                     history[0]["mean_reward"], history[-1]["mean_reward"], per_step["kl"])
    return 0


if __name__ == "__main__":
    main_guard(main)
