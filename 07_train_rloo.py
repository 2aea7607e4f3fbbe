"""Stage 07: RLOO (trl's RLOOTrainer) on the rule-based reward, starting from the SFT model.

Each step samples algorithm.num_generations completions for each of algorithm.prompts_per_step train prompts,
scores them with the reward calculator (one trl reward function per component, summing to the total), subtracts
beta * KL to the SFT model (summed over the completion) and uses the leave-one-out baseline: a completion's
advantage is its reward minus the mean reward of the prompt's other completions. A new LoRA adapter trains on the
SFT model with its adapter merged; the reference is that model with the new adapter off. Writes
ckpt_rloo/{best,final}/, logs/training_log.json, val_generations/step_N.json (step 0 = the SFT model), and
logs/advantage_variance.json: the leave-one-out and plain REINFORCE (no baseline) advantages computed on the same
rollouts each step, with their variance (summary in the manifest). Shared code: utils/rl_trl.py.
"""
import utils  # noqa: F401  (first: sets the threading environment before torch loads)

from utils.cli import main_guard, resolve_config
from utils.rl_trl import RLMethod, run_stage, stage_parser_for

RLOO = RLMethod(
    name="rloo", trainer_class="RLOOTrainer", config_class="RLOOConfig",
    method_keys=("normalize_advantages",), advantage_variance=True,
)


def main() -> int:
    args = stage_parser_for(RLOO, __doc__).parse_args()
    return run_stage(RLOO, args, resolve_config(args))


if __name__ == "__main__":
    main_guard(main)
