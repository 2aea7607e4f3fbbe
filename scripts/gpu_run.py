#!/usr/bin/env python
"""The pipeline end to end on a CUDA GPU at a real scale, and a results bundle small enough to bring back.

    python scripts/gpu_run.py                      # one GPU: 12_driver.py --method all --preset gpu
    python scripts/gpu_run.py --launcher "accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 8"
    python scripts/gpu_run.py --quick_test         # the same steps at --quick_test size, on any machine (CI)
    python scripts/gpu_run.py --cpu_check -- --set grpo.algorithm.steps=1 ...   # the gpu preset on a CPU
    python scripts/gpu_run.py -- --set sft.algorithm.epochs=1   # after --: the driver's own arguments

Runs the driver (base, SFT, PPO, GRPO, RLOO, DPO, every evaluation and 11's report; configs/presets/gpu.yaml, or
--quick_test in its place), then writes <outputs>/<run_id>/bundle.tar.gz: run_manifest.json, every stage's
manifest.json, 10's metrics.json, 11's summary.csv and report.md, and bundle_info.json (the device by name and
memory, torch and CUDA versions, the driver's command and wall time). Without a CUDA GPU it stops before running
anything unless --quick_test or --cpu_check is given. --cpu_check runs the gpu preset itself on this machine's CPU,
to check the GPU users' configuration end to end before a GPU is at hand: cut its budget down with the driver's
--set after -- (tests/test_gpu_preset.py: one step of every method at the preset's batch arithmetic on a tiny
model); its bundle says cpu_check, so its figures are never taken for a GPU's. An interrupted run resumes with
the same command (the driver's rules).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.config import load_yaml, parse_override  # noqa: E402
from utils.files import StageError, open_no_follow  # noqa: E402

DEFAULT_CONFIG = "configs/models/smollm2-135m.yaml"
BUNDLED = ("run_manifest.json", "*/manifest.json", "10_evaluation/*/manifest.json", "10_evaluation/*/metrics.json",
           "11_comparison/summary.csv", "11_comparison/report.md")


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "python": platform.python_version(), "host_cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                        for i in range(torch.cuda.device_count())]
    return info


def outputs_dir(driver_args: list[str]) -> Path:
    """Where the driver writes: the last --set paths.outputs_dir=..., else the model config's paths.outputs_dir."""
    chosen = None
    for flag, value in zip(driver_args, driver_args[1:]):
        if flag == "--set" and value.startswith("paths.outputs_dir="):
            chosen = parse_override(value)[1]
    config = driver_args[driver_args.index("--config") + 1] if "--config" in driver_args[:-1] else DEFAULT_CONFIG
    return Path(chosen or load_yaml(REPO_ROOT / config).get("paths", {}).get("outputs_dir", "outputs"))


def is_bundle(path: Path, run_name: str) -> bool:
    """A bundle this script wrote: a tar.gz (not a link) holding <run>/bundle_info.json."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:gz") as tar:
            return f"{run_name}/bundle_info.json" in tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return False


def write_bundle(run_dir: Path, info: dict) -> Path:
    """Written whole (a .partial beside it, opened without following links, then renamed); a bundle.tar.gz this
    script did not write is never replaced (the folder rule, as for the driver's own files)."""
    bundle = run_dir / "bundle.tar.gz"
    if (bundle.exists() or bundle.is_symlink()) and not is_bundle(bundle, run_dir.name):
        raise StageError(f"{bundle} is not a bundle this script wrote; move it away (nothing was changed)")
    files = sorted({path for pattern in BUNDLED for path in run_dir.glob(pattern) if path.is_file()})
    partial = bundle.with_name(bundle.name + ".partial")
    with open_no_follow(partial) as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(run_dir.parent)))
        data = json.dumps(info, indent=2).encode()
        member = tarfile.TarInfo(f"{run_dir.name}/bundle_info.json")
        member.size, member.mtime = len(data), int(time.time())
        tar.addfile(member, io.BytesIO(data))
    partial.replace(bundle)
    return bundle


def main() -> int:
    argv = sys.argv[1:]
    driver_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick_test", action="store_true", help="the driver's --quick_test instead of the gpu "
                                                                "preset; allowed without a GPU")
    mode.add_argument("--cpu_check", action="store_true", help="the gpu preset on this CPU (allowed without a GPU; "
                                                               "cut its budget with the driver's --set after --)")
    parser.add_argument("--run_id", default="gpu", help="the driver's run folder (default: gpu)")
    parser.add_argument("--launcher", default=None, help="the driver's --launcher (several GPUs)")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    info = device_info()
    if not info["cuda_available"] and not (args.quick_test or args.cpu_check):
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); pass --quick_test to run the same "
              "steps at test size on this machine, or --cpu_check to run the gpu preset itself here", file=sys.stderr)
        return 1
    command = [sys.executable, str(REPO_ROOT / "12_driver.py"), "--method", "all", "--run_id", args.run_id,
               *(["--quick_test"] if args.quick_test else ["--preset", "gpu"]),
               *(["--launcher", args.launcher] if args.launcher else []), *driver_args]
    print("$ " + " ".join(command), flush=True)
    started = time.time()
    code = subprocess.call(command, cwd=REPO_ROOT)
    info.update({"driver_command": command[1:], "driver_exit_code": code,
                 "driver_wall_time_s": round(time.time() - started, 1), "quick_test": args.quick_test,
                 "cpu_check": args.cpu_check})
    run_dir = outputs_dir(driver_args)
    run_dir = (run_dir if run_dir.is_absolute() else REPO_ROOT / run_dir) / args.run_id
    if not run_dir.is_dir():
        print(f"error: {run_dir}: the driver wrote no run folder (exit code {code})", file=sys.stderr)
        return code or 1
    try:
        bundle = write_bundle(run_dir, info)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return code or 1
    print(f"[gpu_run] driver exit code {code} after {info['driver_wall_time_s']} s; bundle: {bundle} "
          f"({bundle.stat().st_size / 1024:.0f} KiB)")
    return code


if __name__ == "__main__":
    sys.exit(main())
