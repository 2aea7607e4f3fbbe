"""Config loading/overrides and run folders/manifests."""
import json

import pytest

from conftest import REPO
from utils.config import ConfigError, config_diff, load_config
from utils.runs import StageError, is_completed, prepare_stage_dir, read_manifest, sha256_path, stage_run

MODEL = REPO / "configs" / "models" / "smollm2-135m.yaml"
SFT = REPO / "configs" / "algorithms" / "sft.yaml"


def test_overrides_keep_types_and_reject_unknown_keys():
    config = load_config(MODEL, SFT, overrides=["training.batch_size=8", "algorithm.epochs=1",
                                                "training.learning_rate=1e-4"])
    assert config["training"]["batch_size"] == 8
    assert config["algorithm"]["epochs"] == 1
    assert config["training"]["learning_rate"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="training.batchsize"):
        load_config(MODEL, overrides=["training.batchsize=8"])
    with pytest.raises(ConfigError, match="training.batch_size.*expects int"):
        load_config(MODEL, overrides=["training.batch_size=lots"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(MODEL, overrides=["training.batch_size"])


def test_named_flags_and_quick_test_overlay():
    full = load_config(MODEL, SFT)
    quick = load_config(MODEL, SFT, quick_test=True, named={"training.learning_rate": 3e-4})
    assert quick["algorithm"]["max_steps"] > 0 and full["algorithm"]["max_steps"] == -1
    assert quick["evaluation"]["max_examples"] and full["evaluation"]["max_examples"] is None
    assert quick["training"]["learning_rate"] == 3e-4
    assert "quick_test" not in quick and "quick_test" not in quick["algorithm"]


def test_bad_config_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("model: {path: x}\n")
    with pytest.raises(ConfigError, match="partial.yaml: missing section"):
        load_config(partial)


def test_manifest_lifecycle_and_no_silent_overwrite(tmp_path):
    folder = tmp_path / "stage"
    with stage_run("demo", folder, {"a": 1}, seed=7) as run:
        assert read_manifest(folder)["status"] == "running"
        (folder / "out.txt").write_text("result")
        run.add_output("out", folder / "out.txt")
        run.metrics["score"] = 0.5
    manifest = read_manifest(folder)
    assert manifest["status"] == "completed" and manifest["seed"] == 7 and manifest["metrics"]["score"] == 0.5
    assert manifest["environment"]["torch"] and manifest["duration_s"] >= 0
    assert (folder / "logs" / "stage.log").is_file()
    with pytest.raises(StageError, match="already holds a completed stage"):
        prepare_stage_dir(folder, "demo", overwrite=False)
    assert (folder / "out.txt").read_text() == "result"
    prepare_stage_dir(folder, "demo", overwrite=True)
    assert not (folder / "out.txt").exists()


def test_failed_stage_records_the_error(tmp_path):
    folder = tmp_path / "stage"
    with pytest.raises(ValueError):
        with stage_run("demo", folder, {}, seed=1):
            raise ValueError("boom")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "boom" in manifest["error"]
    assert not is_completed(folder)
    prepare_stage_dir(folder, "demo", overwrite=False)  # an unfinished stage may be redone


def test_sha256_of_folders_changes_with_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("1")
    first = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("2")
    assert sha256_path(tmp_path / "d") != first
    with pytest.raises(StageError):
        sha256_path(tmp_path / "missing")


def test_an_algo_config_given_instead_needs_only_what_it_changes(tmp_path, capsys):
    from conftest import run_script

    grpo = REPO / "configs" / "algorithms" / "grpo.yaml"
    mine = tmp_path / "grpo_short.yaml"
    mine.write_text("steps: 3\nbeta: 0.0\nquick_test:\n  steps: 1\n")
    full, default = load_config(MODEL, mine, algo_defaults=grpo), load_config(MODEL, grpo)
    assert full["algorithm"] == {**default["algorithm"], "steps": 3, "beta": 0.0}
    quick, default_quick = (load_config(MODEL, mine, True, algo_defaults=grpo),
                            load_config(MODEL, grpo, True))
    assert quick["algorithm"] == {**default_quick["algorithm"], "steps": 1, "beta": 0.0}
    assert full["algo_config_file"] == str(mine)
    mine.write_text("steps: 3\nbetta: 0.0\n")
    with pytest.raises(ConfigError, match="grpo_short.yaml: unknown key.s. betta"):
        load_config(MODEL, mine, algo_defaults=grpo)
    # a stage reading it says so in one line, before any model loads
    assert run_script("06_train_grpo.py", "--algo_config", str(mine), "--output_dir", str(tmp_path / "g")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ") and not (tmp_path / "g").exists()


def test_algorithm_yaml_becomes_trl_arguments_with_renames_and_clear_errors():
    from trl import DPOConfig, GRPOConfig, SFTConfig

    from utils.training import SCHEDULE_KEYS, algorithm_arguments

    sft = load_config(MODEL, SFT, overrides=["algorithm.epochs=2", "algorithm.warmup_ratio=0.25"])["algorithm"]
    arguments = algorithm_arguments(SFTConfig, sft, SCHEDULE_KEYS + ("save_every_steps",))
    assert arguments["num_train_epochs"] == 2 and arguments["warmup_steps"] == 0.25
    assert arguments["save_steps"] == sft["save_every_steps"] and "epochs" not in arguments
    SFTConfig(output_dir="unused", use_cpu=True, **arguments)  # trl takes every one of them
    with pytest.raises(ConfigError, match=r"algorithm.beta: .*SFTConfig has no argument 'beta'"):
        algorithm_arguments(SFTConfig, {**sft, "beta": 0.1}, ("beta",))
    with pytest.raises(ConfigError, match="algorithm.loss_weights: missing"):
        algorithm_arguments(DPOConfig, sft, ("loss_weights",))
    grpo = load_config(MODEL, REPO / "configs" / "algorithms" / "grpo.yaml")["algorithm"]
    from utils.rl_trl import TRL_KEYS
    assert set(algorithm_arguments(GRPOConfig, grpo, TRL_KEYS + ("loss_type",))) >= {"beta", "warmup_steps"}


def test_config_diff_and_keys_added_since():
    old = {"algorithm": {"steps": 2}}
    new = {"algorithm": {"steps": 2, "sft_checkpoint": None, "reward_weights": {}, "train_prompts": "all"}}
    assert len(config_diff(old, new)) == 3  # what run_diff shows
    # the driver's skip rule: an added key at a null or {} default keeps what the old configuration did
    assert config_diff(old, new, added_defaults_differ=False) == ["algorithm.train_prompts: (absent) -> 'all'"]
    assert config_diff(new, old, added_defaults_differ=False)  # a removed key is still a change
