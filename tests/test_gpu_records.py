"""Issue 33: the GPU path, tested before a GPU. `dtype: auto` picks bf16 on CUDA only from compute capability 8.0,
and a stage that used CUDA records its peak GPU memory (its manifest, the driver's run_manifest.json and summary).
No GPU here: torch.cuda's functions are monkeypatched, and nothing of this has yet run on a GPU."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from utils.compute import choose_precision
from utils.driver import Decision, RunManifest, StageSpec, execute
from utils.runs import MIB, StageRun, gpu_memory, peak_gpu_mib, write_json_atomic

GIB = 1 << 30


@pytest.mark.parametrize("capability, dtype", [((7, 0), "float32"), ((7, 5), "float32"),
                                               ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_picks_bf16_on_cuda_only_from_compute_capability_8(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a V100 and a T4 say too
    chosen = choose_precision("auto", torch.device("cuda"))
    assert chosen.dtype == dtype and chosen.device == "cuda"
    shown = f"{capability[0]}.{capability[1]}"
    assert f"GPU compute capability {shown}" in chosen.reason
    assert ("native bf16" in chosen.reason) == (dtype == "bfloat16")


def fake_cuda(monkeypatch, reserved: dict[int, int], current: int = 0):
    """Three GPUs of 80 GiB, CUDA initialised, reserved[i] bytes reserved at peak on device i (allocated: half)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved.get(device, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: reserved.get(device, 0) // 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name=f"Fake GPU {device}", total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {device}")


def stage_manifest(tmp_path) -> dict:
    return StageRun(stage="sft", dir=tmp_path, config={}, seed=0)._manifest("completed")


def test_stage_manifest_records_peak_gpu_memory_of_the_devices_used(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fake_cuda(monkeypatch, {0: 3 * GIB, 2: 10 * GIB + 5 * MIB})
    manifest = stage_manifest(tmp_path)
    assert manifest["gpu_memory"] == {"scope": "the stage's one process", "devices": [
        {"index": 0, "name": "Fake GPU 0", "total_mib": 81920.0, "max_allocated_mib": 1536.0,
         "max_reserved_mib": 3072.0},
        {"index": 2, "name": "Fake GPU 2", "total_mib": 81920.0, "max_allocated_mib": 5122.5,
         "max_reserved_mib": 10245.0}]}
    assert manifest["environment"]["device"] == "cuda (Fake GPU 0)"
    assert peak_gpu_mib(manifest) == 10245.0


def test_several_processes_record_the_main_process_device(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    fake_cuda(monkeypatch, {}, current=1)  # CUDA started, nothing allocated yet: the current device, at zero
    record = gpu_memory()
    assert record["scope"] == "the main process of 2 (the others' devices are not recorded)"
    assert [(d["index"], d["max_reserved_mib"], d["total_mib"]) for d in record["devices"]] == [(1, 0.0, 81920.0)]


def test_cpu_stage_records_no_gpu_memory_and_never_starts_cuda(monkeypatch, tmp_path):
    manifest = stage_manifest(tmp_path)  # this machine as it is: no CUDA
    assert "gpu_memory" not in manifest and not torch.cuda.is_initialized()

    # A CPU or data stage on a GPU machine: CUDA is there but this process never started it.
    def starts_cuda(*args, **kwargs):
        raise AssertionError("recording the manifest started CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("_lazy_init", "init", "current_device", "get_device_name", "get_device_properties",
                 "get_device_capability", "mem_get_info", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, starts_cuda)
    manifest = stage_manifest(tmp_path)
    assert "gpu_memory" not in manifest and peak_gpu_mib(manifest) is None
    assert manifest["environment"]["device"].startswith("cpu (") and "CUDA available, not used" in \
        manifest["environment"]["device"]
    monkeypatch.delitem(sys.modules, "torch")  # a data stage that never imported torch
    assert gpu_memory() is None


def test_driver_records_and_prints_the_peak_gpu_memory_of_a_stage_it_ran(tmp_path):
    gpu = {"scope": "the stage's one process", "devices": [
        {"index": 0, "name": "Fake GPU", "total_mib": 81920.0, "max_allocated_mib": 900.0, "max_reserved_mib": 1234.4}]}
    skipped, ran = (StageSpec(name, key, script) for name, key, script in (
        ("01_preprocessing", "prepare", "01_prepare_dataset.py"), ("03_sft", "sft", "03_sft_train.py")))
    for spec in (skipped, ran):  # what each stage's manifest says once it has run (the skipped one: earlier)
        write_json_atomic(tmp_path / spec.name / "manifest.json",
                          {"stage": spec.name, "status": "completed", "duration_s": 1.0, "gpu_memory": gpu})
    decisions = [Decision(skipped, "skip", ["up to date"]),
                 Decision(ran, "run", ["new"], command=[sys.executable, "-c", "pass"])]
    resolver = SimpleNamespace(run_root=tmp_path, stage_dir=lambda spec: tmp_path / spec.name)
    manifest = RunManifest(tmp_path, ["12_driver.py"], ["none"], decisions)
    printed = []
    assert execute(resolver, decisions, manifest, printed.append) == 0

    entries = {e["stage"]: e for e in json.loads((tmp_path / "run_manifest.json").read_text())["stages"]}
    assert entries["03_sft"]["peak_gpu_mib"] == 1234.4 and entries["03_sft"]["peak_rss_mb"] is not None
    assert entries["01_preprocessing"]["peak_gpu_mib"] is None  # not run by this invocation, as its peak_rss_mb
    summary = "".join(printed).split("summary (", 1)[1].splitlines()
    assert "gpu 1234 MiB" in next(line for line in summary if "03_sft" in line)
    assert "gpu" not in next(line for line in summary if "01_preprocessing" in line)

