"""The stage registry (utils/stages.py): it reproduces the tables the stages were spread over before it, a run
completed before it is still up to date, and a declared variant is planned, evaluated and compared."""
from __future__ import annotations

import re

import pytest

from conftest import REPO
from utils.compare import comparison_config
from utils.evaluations import COMPUTE_FOLDERS
from utils.cli import UsageError
from utils.config import load_config
from utils.driver import (DriverSettings, build_plan, main as driver_main, parse_methods, plan_and_resolver,
                          preset_overrides)
from utils.runs import STAGE_FOLDERS, write_json_atomic
from utils.stages import METHODS, RL_METHODS, STAGES, VARIANTS, label_checkpoint

# The tables as they were written out before the registry (utils/runs.py, utils/driver.py, 10_evaluate.py,
# utils/compare.py and each script's stage_run literal): users' runs depend on every entry.
OLD_STAGE_FOLDERS = {
    "check_data": "00_data_validation", "prepare": "01_preprocessing", "rewards": "02_rewards", "sft": "03_sft",
    "candidates": "04_candidates", "ppo": "05_ppo", "grpo": "06_grpo", "rloo": "07_rloo",
    "preferences": "08_preferences", "dpo": "09_dpo", "evaluation": "10_evaluation", "comparison": "11_comparison"}
OLD_SCRIPTS = {
    "check_data": "00_check_data.py", "prepare": "01_prepare_dataset.py", "rewards": "02_build_rewards.py",
    "sft": "03_sft_train.py", "candidates": "04_generate_candidates.py", "ppo": "05_train_ppo.py",
    "grpo": "06_train_grpo.py", "rloo": "07_train_rloo.py", "preferences": "08_build_prefs.py",
    "dpo": "09_train_dpo.py", "evaluation": "10_evaluate.py", "comparison": "11_compare_runs.py"}
OLD_ALGO_CONFIGS = {"sft": "configs/algorithms/sft.yaml", "ppo": "configs/algorithms/ppo.yaml",
                    "grpo": "configs/algorithms/grpo.yaml", "rloo": "configs/algorithms/rloo.yaml",
                    "preferences": "configs/algorithms/dpo.yaml", "dpo": "configs/algorithms/dpo.yaml"}
OLD_RESUMABLE = {"sft": ("ckpt_sft/checkpoints/checkpoint-*", "--resume"),
                 # since issue 34: the methods' stages resume too (tests/test_rl_resume.py)
                 "ppo": ("ckpt_ppo/checkpoints/checkpoint-*", "--resume"),
                 "grpo": ("ckpt_grpo/checkpoints/checkpoint-*", "--resume"),
                 "rloo": ("ckpt_rloo/checkpoints/checkpoint-*", "--resume"),
                 "dpo": ("ckpt_dpo/checkpoints/checkpoint-*", "--resume")}
_F = OLD_STAGE_FOLDERS
OLD_DEPENDS = {
    "check_data": (), "prepare": (), "rewards": (),
    "sft": (_F["prepare"], _F["rewards"]),
    "candidates": (_F["prepare"], _F["rewards"], _F["sft"]),
    "ppo": (_F["prepare"], _F["rewards"], _F["sft"]),
    "grpo": (_F["prepare"], _F["rewards"], _F["sft"]),
    "rloo": (_F["prepare"], _F["rewards"], _F["sft"]),
    "preferences": (_F["prepare"], _F["rewards"], _F["candidates"]),
    "dpo": (_F["prepare"], _F["rewards"], _F["sft"], _F["preferences"])}
OLD_LABEL_CHECKPOINTS = {"sft": ("sft", "ckpt_sft/best"), "ppo": ("ppo", "ckpt_ppo/final"),
                         "grpo": ("grpo", "ckpt_grpo/final"), "rloo": ("rloo", "ckpt_rloo/final"),
                         "dpo": ("dpo", "ckpt_dpo/final")}
OLD_COMPUTE_FOLDERS = {_F[key] for key in ("sft", "candidates", "ppo", "grpo", "rloo", "preferences", "dpo")}
OLD_MANIFEST_NAMES = {key: script[:-3] for key, script in OLD_SCRIPTS.items()}


def test_registry_reproduces_the_old_tables():
    main_stages = {key: stage for key, stage in STAGES.items() if stage.variant_of is None}
    assert {key: stage.folder for key, stage in main_stages.items()} == OLD_STAGE_FOLDERS
    assert {key: STAGE_FOLDERS[key] for key in OLD_STAGE_FOLDERS} == OLD_STAGE_FOLDERS
    assert {key: stage.script for key, stage in main_stages.items()} == OLD_SCRIPTS
    assert {key: stage.algo_config for key, stage in main_stages.items() if stage.algo_config} == OLD_ALGO_CONFIGS
    assert {key: stage.resume for key, stage in main_stages.items() if stage.resume} == OLD_RESUMABLE
    assert {key: tuple(STAGE_FOLDERS[r] for r in stage.reads) for key, stage in main_stages.items()
            if key in OLD_DEPENDS} == OLD_DEPENDS
    assert {key: (label_checkpoint(key).key, label_checkpoint(key).checkpoint)
            for key in main_stages if label_checkpoint(key)} == OLD_LABEL_CHECKPOINTS
    assert {key: stage.manifest_name for key, stage in main_stages.items()} == OLD_MANIFEST_NAMES
    assert COMPUTE_FOLDERS - {STAGES[v].folder for v in VARIANTS} == OLD_COMPUTE_FOLDERS
    assert METHODS == ("ppo", "grpo", "rloo", "dpo")
    assert tuple(m for m in RL_METHODS if m not in VARIANTS) == ("ppo", "grpo", "rloo")
    for stage in STAGES.values():  # every script and YAML it names exists; a variant runs its method's
        assert (REPO / stage.script).is_file() and (stage.algo_config is None or (REPO / stage.algo_config).is_file())
        if stage.variant_of:
            base = STAGES[stage.variant_of]
            assert (stage.script, stage.algo_config, stage.checkpoint) == (base.script, base.algo_config,
                                                                           base.checkpoint)


def _old_manifest(key: str, config: dict, seed: int = 42) -> dict:
    return {"stage": OLD_MANIFEST_NAMES[key], "status": "completed", "seed": seed, "config": config,
            "inputs": {}, "outputs": {}}


def test_a_run_completed_before_the_registry_is_up_to_date(tmp_path, monkeypatch):
    """Manifests laid out and resolved the old way (old folders, manifest names and --algo_config files, the
    same model config and --quick_test): the driver plans nothing."""
    monkeypatch.chdir(REPO)
    model = "configs/models/smollm2-135m.yaml"
    outputs = tmp_path / "outputs"
    run_dir = outputs / "old_run"
    shared = [f"paths.outputs_dir={outputs}"]
    for key in ("check_data", "prepare", "rewards", "sft", "candidates", "ppo", "grpo", "rloo", "preferences", "dpo"):
        config = load_config(model, OLD_ALGO_CONFIGS.get(key), True, shared)
        for added_since in ("sft_checkpoint", "reward_weights"):  # keys added later, at defaults that keep the old way
            config.get("algorithm", {}).pop(added_since, None)
        write_json_atomic(run_dir / OLD_STAGE_FOLDERS[key] / "manifest.json", _old_manifest(key, config))
    for label in ("base", "sft", "ppo", "grpo", "rloo", "dpo"):
        config = load_config(model, None, True, shared)
        write_json_atomic(run_dir / "10_evaluation" / label / "manifest.json", _old_manifest("evaluation", config))
    write_json_atomic(run_dir / "11_comparison" / "manifest.json",
                      _old_manifest("comparison", comparison_config([str(run_dir)], [])))
    out: list[str] = []
    code = driver_main(["--method", "all", "--quick_test", "--run_id", "old_run", "--set",
                        f"paths.outputs_dir={outputs}", "--dry_run"], echo=out.append)
    text = "".join(out)
    assert code == 0 and "17 stage(s), 0 to run, 17 up to date" in text, text


def test_a_variant_is_a_planned_stage_with_its_own_label(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert parse_methods("all") == list(METHODS) and "grpo_dr" not in parse_methods("all")
    plan = {spec.name: spec for spec in build_plan(parse_methods("grpo,grpo_dr"))}
    assert "06_grpo_dr" in plan and "10_evaluation/grpo_dr" in plan
    assert plan["10_evaluation/grpo_dr"].depends[-1] == "06_grpo_dr"
    assert "10_evaluation/grpo_dr" in plan["11_comparison"].depends

    settings = DriverSettings("configs/models/smollm2-135m.yaml", "r", 42, True,
                              [f"paths.outputs_dir={tmp_path}", "06_grpo_dr.algorithm.steps=3"])
    specs, resolver = plan_and_resolver(parse_methods("grpo,grpo_dr"), settings)
    specs = {spec.name: spec for spec in specs}
    variant, base = specs["06_grpo_dr"], specs["06_grpo"]
    command = resolver.command(variant, "fresh")
    assert command[1].endswith("06_train_grpo.py")
    assert command[command.index("--output_dir") + 1] == str(tmp_path / "r" / "06_grpo_dr")
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert sets[:2] == ["algorithm.loss_type=dr_grpo", "algorithm.scale_rewards=none"]  # before the user's
    assert "--output_dir" not in resolver.command(base, "fresh")
    config, base_config = resolver.config(variant), resolver.config(base)
    assert (config["algorithm"]["loss_type"], config["algorithm"]["scale_rewards"]) == ("dr_grpo", "none")
    assert config["algorithm"]["steps"] == 3 and base_config["algorithm"]["steps"] != 3
    assert base_config["algorithm"]["loss_type"] == "dapo"

    # the mixed-prompt variant reads 04's candidates, so 04 joins the plan for it
    settings.overrides = [f"paths.outputs_dir={tmp_path}"]
    specs, _ = plan_and_resolver(parse_methods("grpo_mixed"), settings)
    names = [spec.name for spec in specs]
    assert names.index("04_candidates") < names.index("06_grpo_mixed")
    assert "04_candidates" in dict((s.name, s) for s in specs)["06_grpo_mixed"].depends

    # the reward's partial credit and an earlier SFT checkpoint are config keys too (test_grpo_rloo runs them)
    specs, resolver = plan_and_resolver(parse_methods("grpo_partial06,grpo_sft50"), settings)
    specs = {spec.name: spec for spec in specs}
    partial, early = (resolver.config(specs[name])["algorithm"] for name in ("06_grpo_partial06", "06_grpo_sft50"))
    assert partial["reward_weights"] == {"partial_program": 0.6} and partial["sft_checkpoint"] is None
    assert early["sft_checkpoint"] == "ckpt_sft/checkpoints/checkpoint-50" and early["reward_weights"] == {}

    # a PPO variant: its override comes after the preset's 05.algorithm.learning_rate, so it wins
    settings.overrides = [f"paths.outputs_dir={tmp_path}"]
    settings.preset = preset_overrides("cpu")[1]
    specs, resolver = plan_and_resolver(parse_methods("ppo_lr3e5"), settings)
    spec = {spec.name: spec for spec in specs}["05_ppo_lr3e5"]
    algorithm = resolver.config(spec)["algorithm"]
    assert algorithm["learning_rate"] == 3.0e-5 and algorithm["steps"] == 8  # the variant's lr, the preset's budget


def test_evaluate_finds_a_variants_checkpoint(tmp_path):
    stage = label_checkpoint("grpo_dr")
    assert stage.folder == "06_grpo_dr" and stage.checkpoint == "ckpt_grpo/final"
    assert label_checkpoint("base") is None and label_checkpoint("rewards") is None


@pytest.mark.parametrize("key", sorted(STAGES))
def test_every_stage_folder_is_unique_and_numbered(key):
    stage = STAGES[key]
    assert stage.folder[:2].isdigit() and stage.folder[2] == "_"
    assert [s.folder for s in STAGES.values()].count(stage.folder) == 1


def test_a_preset_is_a_list_of_driver_sets_the_command_line_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out: list[str] = []
    code = driver_main(["--method", "grpo,grpo_g16", "--preset", "cpu", "--run_id", "p", "--set",
                        f"paths.outputs_dir={tmp_path}", "--set", "grpo.algorithm.steps=3", "--dry_run"],
                       echo=out.append)
    text = "".join(out)
    assert code == 0, text
    grpo = next(line for line in text.splitlines() if "06_train_grpo.py" in line and "--output_dir" not in line)
    assert "data.raw_dir=../shared/finqa_core" in grpo and "algorithm.num_generations=8" in grpo
    assert grpo.index("algorithm.steps=8") < grpo.index("algorithm.steps=3")  # the command line's --set wins
    # the preset's budget reaches a variant (06 names the script), and the variant's own overrides win over it
    g16 = next(line for line in text.splitlines() if "06_grpo_g16" in line and "06_train_grpo.py" in line)
    assert "algorithm.steps=8" in g16 and "algorithm.steps=3" not in g16
    assert g16.index("algorithm.num_generations=8") < g16.index("algorithm.num_generations=16")
    sft = next(line for line in text.splitlines() if "03_sft_train.py" in line)
    assert "algorithm.epochs=3" in sft and "num_generations" not in sft

    bad = tmp_path / "bad.yaml"
    bad.write_text("set: data.raw_dir=x\n")
    for preset, message in (("nope", "configs/presets/nope.yaml not found (presets: cpu"),
                            (str(bad), "needs `set:` as a list")):
        with pytest.raises(UsageError, match=re.escape(message)):
            driver_main(["--method", "grpo", "--preset", preset, "--dry_run"], echo=out.append)
