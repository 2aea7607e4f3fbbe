"""Issue 34: GRPO and RLOO (trl's checkpoints) and PPO (its own, utils.ppo.PPOTrainer.save_state) resume after an
interruption from their last checkpoint and end where an uninterrupted run ends: the same final adapter (float32 on a
CPU: equal to 1e-6), the same logs and figures; the driver resumes such a stage by itself."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from test_grpo_rloo import lora_b_norm, reward_calls  # noqa: F401  (the fixture: a reward the tiny model can learn)
from utils import rl_trl
from utils.ppo import VALUE_HEAD_FILE, PPOTrainer
from utils.reward import COMPONENTS
from utils.runs import read_manifest

EVERY_STEP = ("--quick_test", "--set", "algorithm.save_every_steps=1", "--set", "algorithm.eval_every_steps=1")


class KilledAt(TrainerCallback):
    """The process dies as step `step` begins (after the checkpoint of the step before was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def adapter(folder):
    weights = load_file(folder / "adapter_model.safetensors")
    if (folder / VALUE_HEAD_FILE).is_file():  # PPO: the value head trains too
        weights.update({f"value_head.{k}": v for k, v in torch.load(folder / VALUE_HEAD_FILE).items()})
    return weights


def killed_at_step(monkeypatch, method: str, step: int) -> None:
    """The stage's process dies as step `step` begins (after the checkpoint of the step before was written)."""
    if method == "ppo":
        real, calls = PPOTrainer.step, []

        def dying(self, rows):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            return real(self, rows)
        monkeypatch.setattr(PPOTrainer, "step", dying)
    else:
        real = rl_trl.make_trainer
        monkeypatch.setattr(rl_trl, "make_trainer", lambda *a, **k: _with(real(*a, **k), KilledAt(step)))


SCRIPTS = {"ppo": ("05_train_ppo.py", "05_ppo"), "grpo": ("06_train_grpo.py", "06_grpo"),
           "rloo": ("07_train_rloo.py", "07_rloo")}


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_rl_stage_resumes_to_the_uninterrupted_result(run_stage, reward_calls, monkeypatch, tmp_path, method):
    script, folder_name = SCRIPTS[method]
    assert run_stage("01_prepare_dataset.py") == 0
    assert run_stage("03_sft_train.py", "--quick_test", "--max_steps", "1", "--skip_validation") == 0
    whole = tmp_path / "whole"
    assert run_stage(script, *EVERY_STEP, "--output_dir", str(whole)) == 0

    with monkeypatch.context() as patch:
        killed_at_step(patch, method, 2)
        assert run_stage(script, *EVERY_STEP) == 130  # interrupted (main_guard: Ctrl-C / kill)
    folder = run_stage.stage_dir(folder_name)
    assert read_manifest(folder)["status"] != "completed"
    assert (folder / f"ckpt_{method}" / "checkpoints" / "checkpoint-1").is_dir()

    # the driver sees an unfinished stage with a checkpoint, unchanged config and inputs: it resumes it
    out = []
    code = rl_trl_driver(run_stage, method, out)
    assert code == 0 and "RUN (resume)" in "".join(out), "".join(out)

    reward_calls.clear()
    steps_taken = []
    real_step = PPOTrainer.step
    monkeypatch.setattr(PPOTrainer, "step", lambda self, rows: (steps_taken.append(1), real_step(self, rows))[1])
    assert run_stage(script, *EVERY_STEP, "--resume") == 0
    if method == "ppo":
        assert len(steps_taken) == 1  # step 2 only
    else:
        assert {call["n"] for call in reward_calls} == {4} and len(reward_calls) == len(COMPONENTS)  # step 2 only
    resumed, uninterrupted = read_manifest(folder), read_manifest(whole)
    assert resumed["status"] == "completed"
    for name in ("final", "best"):
        a, b = adapter(whole / f"ckpt_{method}" / name), adapter(folder / f"ckpt_{method}" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert lora_b_norm(folder / f"ckpt_{method}" / "final") > 0  # it trained: the comparison is not of zeros
    for key in ("total_completions", "total_generated_tokens", "groups_with_zero_reward_variance",
                "initial_val_reward", "final_val_reward", "best_val_reward", "best_step", "final_kl"):
        if key in uninterrupted["metrics"]:
            expected = uninterrupted["metrics"][key]
            assert resumed["metrics"][key] == (expected if isinstance(expected, dict) else pytest.approx(expected)), key
    assert [v["step"] for v in resumed["metrics"]["validation"]] == [0, 1, 2]
    reward = "reward_mean" if method == "ppo" else "reward"
    logs = [json.loads((f / "logs" / "training_log.json").read_text()) for f in (folder, whole)]
    steps = [[r["step"] for r in log if reward in r] for log in logs]
    assert steps[0] == steps[1] == [1, 2]  # step 2 logged once, after resuming
    assert [r[reward] for r in logs[0] if reward in r] == pytest.approx([r[reward] for r in logs[1] if reward in r])


def _with(trainer, callback):
    trainer.add_callback(callback)
    return trainer


def rl_trl_driver(run_stage, method: str, out: list) -> int:
    from utils.driver import main as driver_main

    number = SCRIPTS[method][1][:2]
    return driver_main(["--method", method, "--quick_test", *run_stage.base, "--stages", number, "--dry_run",
                        "--set", f"{number}.algorithm.save_every_steps=1",
                        "--set", f"{number}.algorithm.eval_every_steps=1"], echo=out.append)


def test_dpo_resumes_to_the_uninterrupted_result(run_stage, monkeypatch, tmp_path):
    import trl

    for script, *flags in (("01_prepare_dataset.py",), ("02_build_rewards.py",),
                           ("03_sft_train.py", "--quick_test", "--skip_validation", "--max_steps", "1"),
                           ("04_generate_candidates.py", "--quick_test"), ("08_build_prefs.py", "--quick_test")):
        assert run_stage(script, *flags) == 0
    every_step = ("--quick_test", "--max_steps", "2", "--learning_rate", "1e-3", "--set", "algorithm.eval_every_steps=1",
                  "--set", "algorithm.save_every_steps=1")
    whole = tmp_path / "whole"
    passes = []
    real_step = trl.DPOTrainer.training_step
    monkeypatch.setattr(trl.DPOTrainer, "training_step", lambda self, *a, **k: (passes.append(1),
                                                                                real_step(self, *a, **k))[1])
    assert run_stage("09_train_dpo.py", *every_step, "--output_dir", str(whole)) == 0
    whole_passes, passes[:] = len(passes), []

    class Killed(trl.DPOTrainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, KilledAt(2)], **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(trl, "DPOTrainer", Killed)
        assert run_stage("09_train_dpo.py", *every_step) == 130
    folder = run_stage.stage_dir("09_dpo")
    assert (folder / "ckpt_dpo" / "checkpoints" / "checkpoint-1").is_dir()
    passes.clear()
    assert run_stage("09_train_dpo.py", *every_step, "--resume") == 0
    assert len(passes) == whole_passes // 2  # step 2 only

    resumed, uninterrupted = read_manifest(folder), read_manifest(whole)
    for name in ("final", "best"):
        a, b = adapter(whole / "ckpt_dpo" / name), adapter(folder / "ckpt_dpo" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert lora_b_norm(folder / "ckpt_dpo" / "final") > 0
    for key in ("steps", "preference_accuracy_after", "final_loss", "best_val_reward", "best_step"):
        assert resumed["metrics"][key] == pytest.approx(uninterrupted["metrics"][key]), key
    assert [v["step"] for v in resumed["metrics"]["validation"]] == [0, 1, 2]
