"""The GPU launch path, checked before a GPU: what configs/accelerate/*.yaml resolve to under accelerate's own
launch validation, the driver's process count for each, and the refusals that stand in for setups this project
does not support (PPO under DeepSpeed, trl's vLLM server mode, a vLLM install beside this stack)."""
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

def test_vllm_server_mode_is_refused_on_any_device():
    from utils.rl_trl import require_vllm_if_asked

    for device in ("cuda", "cpu"):
        with pytest.raises(ConfigError, match="^algorithm.vllm_mode: server needs a `trl vllm-serve` process.*"
                                              "use algorithm.vllm_mode=colocate$"):
            require_vllm_if_asked({"use_vllm": True, "vllm_mode": "server"}, torch.device(device))
    require_vllm_if_asked({"use_vllm": False, "vllm_mode": "server"}, torch.device("cpu"))  # mode unused: fine


def test_missing_vllm_names_the_versions_not_a_pip_command(monkeypatch):
    from utils.rl_trl import VLLM_UNAVAILABLE, require_vllm_if_asked

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError) as err:
        require_vllm_if_asked({"use_vllm": True, "vllm_mode": "colocate"}, torch.device("cuda"))
    assert str(err.value) == (f"algorithm.use_vllm: the vllm package is not installed: {VLLM_UNAVAILABLE} "
                              f"(set algorithm.use_vllm=false)")
    assert "pip install" not in str(err.value)


def test_the_vllm_versions_named_are_those_of_this_stack():
    from utils.rl_trl import VLLM_UNAVAILABLE

    trl_extra = [r.split(";")[0].replace(" ", "") for r in importlib.metadata.requires("trl")
                 if r.startswith("vllm") and 'extra == "vllm"' in r]
    assert len(trl_extra) == 1
    bounds = trl_extra[0].removeprefix("vllm").split(",")
    lower, upper = (next(b for b in bounds if b.startswith(op)) for op in (">=", "<="))
    trl_minor = importlib.metadata.version("trl").rsplit(".", 1)[0]
    assert f"trl {trl_minor} supports vllm{lower},{upper} " in VLLM_UNAVAILABLE
    assert f"vLLM {upper.removeprefix('<=').removesuffix('.0')} needs transformers<" in VLLM_UNAVAILABLE
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    transformers_pin = next(pin for pin in pins if pin.startswith("transformers=="))
    assert f"requirements.txt pins {transformers_pin}" in VLLM_UNAVAILABLE
