"""Stage 06: GRPO (trl's GRPOTrainer) on the rule-based reward, starting from the SFT model.

Each step samples algorithm.num_generations completions for each of algorithm.prompts_per_step train prompts,
scores them with the reward calculator (one trl reward function per component, summing to the total) and takes
one policy-gradient step with group-normalised advantages (reward - group mean, / group std with scale_rewards
group) and beta * KL to the SFT model in the loss. A new LoRA adapter trains on the SFT model with its adapter
merged; the reference is that model with the new adapter off. Writes ckpt_grpo/{best,final}/ (best by val
reward, the SFT start included), logs/training_log.json (trl's metrics every step) and val_generations/step_N.json
(greedy validation every algorithm.eval_every_steps, step 0 = the SFT model). Shared code: utils/rl_trl.py.
"""
import utils  # noqa: F401  (first: sets the threading environment before torch loads)

from utils.cli import ConfigFlag, main_guard, resolve_config
from utils.rl_trl import RLMethod, run_stage, stage_parser_for

GRPO = RLMethod(
    name="grpo", trainer_class="GRPOTrainer", config_class="GRPOConfig",
    flags=(ConfigFlag("--loss_type", "algorithm.loss_type", str, "trl loss aggregation: dapo, grpo, dr_grpo, bnpo"),),
    method_keys=("loss_type", "scale_rewards"),
)


def main() -> int:
    args = stage_parser_for(GRPO, __doc__).parse_args()
    return run_stage(GRPO, args, resolve_config(args))


if __name__ == "__main__":
    main_guard(main)
