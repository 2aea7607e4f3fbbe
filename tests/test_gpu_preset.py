"""Issue 33: the GPU users' configuration (configs/presets/gpu.yaml) is loaded and run here, not only read.

- a dry run resolves every stage's configuration under the preset (strict config errors included);
- scripts/gpu_run.py --cpu_check runs the preset itself end to end on this CPU, one step of each method at the
  preset's batch arithmetic (16 completions a step: GRPO/RLOO 4 prompts x 4, PPO rollouts of 16 in mini-batches of
  4 rows over 4 epochs, the shared-prefix path; SFT/DPO batches of 4 with 2 accumulation steps; generation batches
  of 32) on a tiny model, and writes the bundle a GPU run brings back."""
import json
import subprocess
import sys
import tarfile

from conftest import REPO, run_script
from utils.driver import DriverSettings, parse_methods, plan_and_resolver, preset_overrides

METHODS = ("ppo", "grpo", "rloo", "dpo")


def test_gpu_preset_resolves_for_every_stage(tmp_path, capsys):
    code = run_script("12_driver.py", "--method", "all", "--preset", "gpu", "--dry_run",
                      "--set", f"paths.outputs_dir={tmp_path / 'outputs'}")
    out = capsys.readouterr().out
    assert code == 0, out
    plan = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert len(plan) == 17 and all(" RUN " in line for line in plan), out
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing

    _, entries = preset_overrides("gpu")
    plan, resolver = plan_and_resolver(parse_methods("all,grpo_random,ppo_format"), DriverSettings(
        "configs/models/smollm2-135m.yaml", "gpu", 42, False, preset=entries))
    configs = {spec.name: resolver.config(spec) for spec in plan}
    grpo, rloo, ppo = (configs[name]["algorithm"] for name in ("06_grpo", "07_rloo", "05_ppo"))
    assert grpo["steps"] == rloo["steps"] == ppo["steps"] == 100
    # a method's variants and controls get its budget (the preset names stages by number)
    assert configs["06_grpo_random"]["algorithm"]["steps"] == configs["05_ppo_format"]["algorithm"]["steps"] == 100
    assert grpo["prompts_per_step"] * grpo["num_generations"] == 16 == rloo["prompts_per_step"] * rloo["num_generations"]
    assert ppo["rollout_batch_size"] == 16 and ppo["mini_batch_size"] == 4 and ppo["ppo_epochs"] == 4
    assert all(config["data"]["raw_dir"] == "../shared/finqa_core" for config in configs.values()
               if "data" in config)
    # generation on vLLM: 04 and every evaluation, GRPO's and RLOO's rollouts (and their variants'); PPO's own loop
    assert {name for name, config in configs.items() if config.get("generation", {}).get("engine") == "vllm"} == \
        {"04_candidates", *(name for name in configs if name.startswith("10_evaluation"))}
    assert {name for name, config in configs.items() if config.get("algorithm", {}).get("use_vllm")} == \
        {"06_grpo", "07_rloo", "06_grpo_random"}


def test_gpu_preset_runs_on_a_cpu(tiny_model_dir, finqa_dir, tmp_path):
    outputs = tmp_path / "outputs"
    cut = ["--set", f"model.path={tiny_model_dir}", "--set", f"data.raw_dir={finqa_dir}",
           "--set", f"data.processed_dir={tmp_path / 'processed'}", "--set", f"paths.outputs_dir={outputs}",
           # one step of everything, the batch arithmetic left as the preset has it
           "--set", "sft.algorithm.max_steps=1", "--set", "dpo.algorithm.max_steps=1",
           "--set", "grpo.algorithm.steps=1", "--set", "rloo.algorithm.steps=1", "--set", "ppo.algorithm.steps=1",
           "--set", "algorithm.n_val_examples=4", "--set", "candidates.max_prompts=4",
           "--set", "evaluation.max_examples=4",
           # vLLM cannot serve the tiny model (attention heads 8 wide); tests/test_smoke.py runs it on the real one
           "--set", "generation.engine=native", "--set", "algorithm.use_vllm=false"]
    done = subprocess.run([sys.executable, "scripts/gpu_run.py", "--cpu_check", "--run_id", "gpu", "--", *cut],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run_dir = outputs / "gpu"
    manifests = {name: json.loads((run_dir / name / "manifest.json").read_text())
                 for name in ("03_sft", "05_ppo", "06_grpo", "07_rloo", "09_dpo")}
    assert all(m["status"] == "completed" for m in manifests.values())
    for name in ("05_ppo", "06_grpo", "07_rloo"):
        assert manifests[name]["metrics"]["completions_per_step"] == 16, name
    assert manifests["05_ppo"]["config"]["algorithm"]["mini_batch_size"] == 4
    assert manifests["05_ppo"]["config"]["algorithm"]["max_new_tokens"] == 64  # the preset's, not quick_test's
    assert all(m["config"]["training"]["batch_size"] == 4 for m in manifests.values())
    run_manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert run_manifest["preset"]["name"] == "gpu" and run_manifest["status"] == "completed"
    with tarfile.open(run_dir / "bundle.tar.gz") as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile("gpu/bundle_info.json"))
    assert {f"gpu/10_evaluation/{label}/metrics.json" for label in ("base", "sft", *METHODS)} <= names
    assert info["cpu_check"] and not info["quick_test"] and info["driver_exit_code"] == 0
