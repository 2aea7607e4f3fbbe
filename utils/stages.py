"""Every stage of the pipeline, declared once: its key, folder, script, algorithm config, the checkpoint 10
evaluates, what it reads, whether it resumes, and whether it is a method the driver plans and 11 compares.

Everything that names a stage derives from this table: the run folders (utils.runs.STAGE_FOLDERS), each
script's default folder and manifest name (the script's file name without .py), the driver's plan, skip and
resume rules, 10's default checkpoint for a label, and 11's compute accounting.

A method variant is a stage of its own: the same script and YAML as the method it varies, a few config
overrides, its own key (= its evaluation label) and its own folder. The driver runs it with --output_dir at its
folder and the overrides as --set (before the user's), so its recorded configuration says what it changed;
`--method all` plans the methods, a variant is planned by naming it (`--method grpo,grpo_dr`). Adding a method:
its script, its YAML and one entry here; adding a variant: one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    key: str                           # what flags and labels call it: "sft", "grpo", "grpo_dr"
    folder: str                        # under outputs/<run_id>/: "06_grpo"
    script: str                        # "06_train_grpo.py"
    algo_config: str | None = None     # the --algo_config it reads (configs/algorithms/*.yaml)
    checkpoint: str | None = None      # inside its folder: what 10 --label <key> evaluates by default
    reads: tuple[str, ...] = ()        # keys of the earlier stages whose outputs it reads
    resume: tuple[str, str] | None = None  # (trainer checkpoint glob in its folder, flag that resumes from it)
    method: bool = False               # a training method: planned by --method, evaluated by 10, compared by 11
    rl: bool = False                   # samples its own rollouts (may train on the prompts 04 selects)
    trains: bool = False               # its wall time counts as training compute in 11's report
    variant_of: str | None = None      # the method whose script and YAML it runs, with `overrides`
    overrides: tuple[str, ...] = ()    # KEY=VALUE, as --set
    multi_process: bool = False        # runs under the driver's --launcher (e.g. accelerate launch --num_processes N):
    # its work is split over the processes and the main one writes (utils/processes.py)

    @property
    def number(self) -> str:
        return self.folder[:2]

    @property
    def algo_defaults(self) -> Path | None:
        """Its algorithm YAML wherever the command runs from: the defaults of any --algo_config given instead."""
        return REPO_ROOT / self.algo_config if self.algo_config else None

    @property
    def manifest_name(self) -> str:
        """The `stage` field of its manifest.json: its script's name."""
        return Path(self.script).stem

    @property
    def default_folder(self) -> str:
        """Where its script writes without --output_dir (a variant's script is its method's)."""
        return STAGES[self.variant_of].folder if self.variant_of else self.folder


_DATA = ("prepare", "rewards")
_RL = dict(reads=(*_DATA, "sft"), method=True, rl=True, trains=True, multi_process=True)


def _resumes(method: str) -> dict:
    """A method's stage that continues from its last checkpoint (algorithm.save_every_steps, --resume)."""
    return dict(resume=(f"ckpt_{method}/checkpoints/checkpoint-*", "--resume"))

STAGES: dict[str, Stage] = {stage.key: stage for stage in (
    Stage("check_data", "00_data_validation", "00_check_data.py"),
    Stage("prepare", "01_preprocessing", "01_prepare_dataset.py"),
    Stage("rewards", "02_rewards", "02_build_rewards.py"),
    Stage("sft", "03_sft", "03_sft_train.py", "configs/algorithms/sft.yaml", "ckpt_sft/best", _DATA,
          resume=("ckpt_sft/checkpoints/checkpoint-*", "--resume"), trains=True, multi_process=True),
    Stage("candidates", "04_candidates", "04_generate_candidates.py", reads=(*_DATA, "sft"), trains=True,
          multi_process=True),
    Stage("ppo", "05_ppo", "05_train_ppo.py", "configs/algorithms/ppo.yaml", "ckpt_ppo/final", **_RL,
          **_resumes("ppo")),
    Stage("grpo", "06_grpo", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final", **_RL, **_resumes("grpo")),
    Stage("rloo", "07_rloo", "07_train_rloo.py", "configs/algorithms/rloo.yaml", "ckpt_rloo/final", **_RL, **_resumes("rloo")),
    # 08 reads its pairing rules from dpo.yaml (algorithm.preferences)
    Stage("preferences", "08_preferences", "08_build_prefs.py", "configs/algorithms/dpo.yaml",
          reads=(*_DATA, "candidates"), trains=True),
    Stage("dpo", "09_dpo", "09_train_dpo.py", "configs/algorithms/dpo.yaml", "ckpt_dpo/final",
          (*_DATA, "sft", "preferences"), method=True, trains=True, multi_process=True, **_resumes("dpo")),
    Stage("evaluation", "10_evaluation", "10_evaluate.py", multi_process=True),
    Stage("comparison", "11_comparison", "11_compare_runs.py"),
    # variants: a method's script and YAML with a few overrides, a label and a folder of their own
    Stage("grpo_dr", "06_grpo_dr", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final", **_RL, **_resumes("grpo"),
          variant_of="grpo", overrides=("algorithm.loss_type=dr_grpo", "algorithm.scale_rewards=none")),
    Stage("grpo_mixed", "06_grpo_mixed", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final",
          **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.train_prompts=mixed",)),
    # the study's ablations (configs/presets/cpu.yaml gives every one the same budget per step)
    Stage("grpo_g16", "06_grpo_g16", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final",
          **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.prompts_per_step=1", "algorithm.num_generations=16")),
    Stage("grpo_lr3e4", "06_grpo_lr3e4", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final",
          **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.learning_rate=3.0e-4",)),
    Stage("grpo_t12", "06_grpo_t12", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final",
          **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.temperature=1.2",)),
    Stage("grpo_partial06", "06_grpo_partial06", "06_train_grpo.py", "configs/algorithms/grpo.yaml",
          "ckpt_grpo/final", **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.reward_weights={partial_program: 0.6}",)),
    # an earlier, less peaked SFT policy: a 1-epoch SFT on finqa_core (73 steps, a checkpoint every 25, the last 2
    # kept: the ablation run's) keeps checkpoint-50; the cpu preset's 3 epochs keep 200 and 219, so there set
    # sft.algorithm.save_total_limit higher, or algorithm.sft_checkpoint to a checkpoint that 03 kept
    Stage("grpo_sft50", "06_grpo_sft50", "06_train_grpo.py", "configs/algorithms/grpo.yaml", "ckpt_grpo/final",
          **_RL, **_resumes("grpo"), variant_of="grpo", overrides=("algorithm.sft_checkpoint=ckpt_sft/checkpoints/checkpoint-50",)),
    # PPO's step on a strong SFT: lr 1e-4 with 2 PPO epochs broke the 3-epoch SFT's format at seed 42
    Stage("ppo_lr3e5", "05_ppo_lr3e5", "05_train_ppo.py", "configs/algorithms/ppo.yaml", "ckpt_ppo/final", **_RL,
          **_resumes("ppo"), variant_of="ppo", overrides=("algorithm.learning_rate=3.0e-5",)),
    # controls: each RL method at its own budget on a reward that carries no information about the answer.
    # _random: every step's rewards randomly permuted over its completions (utils.reward.RewardCalculator
    # .for_training: the same values, no link to the completion); _format: the format term alone (0 for a
    # parsable answer, format_violation otherwise), what the method gains from learning the output's shape
    *(Stage(f"{method}_{control}", f"{folder}_{control}", script, f"configs/algorithms/{method}.yaml",
            f"ckpt_{method}/final", **_RL, **_resumes(method), variant_of=method, overrides=(override,))
      for method, folder, script in (("ppo", "05_ppo", "05_train_ppo.py"), ("grpo", "06_grpo", "06_train_grpo.py"),
                                    ("rloo", "07_rloo", "07_train_rloo.py"))
      for control, override in (("random", "algorithm.reward_control=shuffled"),
                                ("format", "algorithm.reward_weights={exact: 0.0, numeric: 0.0, partial_program: 0.0}"))),
    # DAPO's dynamic sampling (utils.rl_trl.DynamicSampler): all-equal groups replaced by varied ones of fresh prompts
    *(Stage(f"{method}_dynamic", f"{folder}_dynamic", script, f"configs/algorithms/{method}.yaml",
            f"ckpt_{method}/final", **_RL, **_resumes(method), variant_of=method,
            overrides=("algorithm.dynamic_sampling=true",))
      for method, folder, script in (("grpo", "06_grpo", "06_train_grpo.py"), ("rloo", "07_rloo", "07_train_rloo.py"))),
    # the budget curve (issue 34): GRPO at 4x and 16x the cpu preset's 8 steps x 16 completions (128), the same
    # completions per step, validated 4 times on the way; the random control and dynamic sampling at those budgets
    *(Stage(f"grpo{kind}_c{16 * steps}", f"06_grpo{kind}_c{16 * steps}", "06_train_grpo.py",
            "configs/algorithms/grpo.yaml", "ckpt_grpo/final", **_RL, **_resumes("grpo"), variant_of="grpo",
            overrides=(f"algorithm.steps={steps}", f"algorithm.eval_every_steps={steps // 4}", *extra))
      for steps in (32, 128)
      for kind, extra in (("", ()), ("_random", ("algorithm.reward_control=shuffled",)),
                          ("_dynamic", ("algorithm.dynamic_sampling=true",)))),
)}

STAGE_FOLDERS = {key: stage.folder for key, stage in STAGES.items()}
METHODS = tuple(key for key, stage in STAGES.items() if stage.method and stage.variant_of is None)  # --method all
VARIANTS = tuple(key for key, stage in STAGES.items() if stage.variant_of)
RL_METHODS = tuple(key for key, stage in STAGES.items() if stage.rl)


def label_checkpoint(label: str) -> Stage | None:
    """The stage whose checkpoint 10 evaluates for an evaluation label (None: the label names no stage)."""
    stage = STAGES.get(label)
    return stage if stage is not None and stage.checkpoint else None


def training_folders() -> set[str]:
    """Folders whose wall time 11 counts as the compute a checkpoint needed."""
    return {stage.folder for stage in STAGES.values() if stage.trains}
