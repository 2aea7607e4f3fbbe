"""Run folders and stage manifests (docs/design.md: "Stages and their folders").

Every stage writes outputs/<run_id>/<stage folder>/manifest.json: status running -> completed | failed, times,
command line, resolved config, seed, inputs with sha256, outputs, headline metrics and the environment (and the
peak GPU memory of a stage that used CUDA: gpu_memory).
Manifests are written atomically (temp file + rename), so a reader never sees half a manifest, and a folder
whose manifest does not say completed is not a finished stage.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.stages import REPO_ROOT, STAGE_FOLDERS  # noqa: F401  (the run layout, declared in utils/stages.py)
from utils import processes
from utils.files import (FolderLock, StageError, open_no_follow, os_error_text, read_json,  # noqa: F401
                         remove_folder_manifest_last, write_atomic, write_json_atomic, write_text_atomic)

MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise StageError(f"cannot read {path} ({os_error_text(err)})") from None
    return digest.hexdigest()


# A folder input is a checkpoint, a data folder or a stage's output: thousands of files and a few GB at most.
# Past these bounds it is a mistake (an input path of `/`), refused before a byte is read.
MAX_INPUT_FILES = 20_000
MAX_INPUT_BYTES = 256 << 30


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (its files' relative paths and hashes, in order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise StageError(f"input not found: {path}")
    files, size = [], 0
    try:
        for file in path.rglob("*"):
            if file.is_file():
                files.append(file)
                size += file.stat().st_size
                if len(files) > MAX_INPUT_FILES or size > MAX_INPUT_BYTES:
                    raise StageError(f"input {path} is not a checkpoint or data folder (over {MAX_INPUT_FILES} "
                                     f"files or {MAX_INPUT_BYTES >> 30} GiB); name the folder itself")
    except OSError as err:
        raise StageError(f"cannot read input {path} ({os_error_text(err)})") from None
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict:
    """Versions (from the installed packages' metadata: importing torch, transformers and trl only to read their
    versions cost a data stage 6 s) and the device of a stage that loaded torch."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    torch = sys.modules.get("torch")
    if torch is None:
        info["device"] = f"cpu ({os.cpu_count()} cores; no model in this stage)"
    elif torch.cuda.is_initialized():  # (naming a GPU before would start CUDA in a stage that never used it)
        info["device"] = f"cuda ({torch.cuda.get_device_name(torch.cuda.current_device())})"
    else:
        unused = "; CUDA available, not used" if torch.cuda.is_available() else ""
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads{unused})"
    return info


MIB = 1 << 20


def gpu_memory() -> dict | None:
    """This process's peak GPU memory, for a stage that used CUDA: per device it used (its allocator reserved
    memory there; else the current device), the device's total and the caching allocator's peaks, in MiB. None
    where torch is not loaded or CUDA was never initialised: a CPU or data stage must not start CUDA to say so.
    Under several processes only the main one writes the manifest, so only its own device is recorded."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    cuda = torch.cuda
    used = [i for i in range(cuda.device_count()) if cuda.max_memory_reserved(i)] or [cuda.current_device()]
    devices = []
    for index in used:
        properties = cuda.get_device_properties(index)
        devices.append({"index": index, "name": properties.name,
                        "total_mib": round(properties.total_memory / MIB, 1),
                        "max_allocated_mib": round(cuda.max_memory_allocated(index) / MIB, 1),
                        "max_reserved_mib": round(cuda.max_memory_reserved(index) / MIB, 1)})
    scope = (f"the main process of {processes.world_size()} (the others' devices are not recorded)"
             if processes.several() else "the stage's one process")
    return {"scope": scope, "devices": devices}


def peak_gpu_mib(manifest: dict) -> float | None:
    """A stage manifest's peak GPU memory: the largest max_reserved_mib of its gpu_memory (what the allocator
    held, so what had to fit), or None where it records none."""
    record = manifest.get("gpu_memory")
    devices = record.get("devices") if isinstance(record, dict) else None
    peaks = [d.get("max_reserved_mib") for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []
    peaks = [p for p in peaks if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return max(peaks) if peaks else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_problem(manifest: Any) -> str | None:
    """Why a parsed manifest.json is not one this project wrote (wrong shape), or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("stage"), str) or not isinstance(manifest.get("status"), str):
        return "no 'stage' and 'status' strings"
    for key in ("config", "inputs", "outputs", "metrics"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"'{key}' is not an object"
    duration = manifest.get("duration_s")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not math.isfinite(duration) or duration < 0):
        return "'duration_s' is not a number of seconds"
    for name, record in (manifest.get("inputs") or {}).items():
        if not (isinstance(record, dict) and isinstance(record.get("path"), str) and record["path"]
                and isinstance(record.get("sha256"), str)):
            return f"input '{name}' is not a {{path, sha256}} record"
    return None


def read_manifest(stage_dir: str | Path) -> dict | None:
    """A stage folder's manifest, or None when it has none this project could have written (missing, not
    readable, or of the wrong shape: every reader may then rely on its fields' types)."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "manifest")
    except StageError:
        return None
    return None if manifest_problem(manifest) else manifest


def is_completed(stage_dir: str | Path) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest) and manifest.get("status") == "completed"


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def plain_name(value: str, flag: str) -> str:
    """Run ids and evaluation labels name one folder: letters, digits, '.', '_', '-', at most 100 characters,
    starting with a letter or digit (so never '..', an absolute path or a hidden folder)."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:60] + "..."
        raise StageError(f"{flag} must be a plain name (letters, digits, '.', '_', '-'; at most 100 "
                         f"characters), got {shown!r}")
    return value


def run_root(run_id: str, outputs_dir: str | Path = "outputs") -> Path:
    return Path(outputs_dir) / plain_name(run_id, "--run_id")


def require_completed(stage_dir: str | Path, hint: str) -> dict:
    """The manifest of a finished upstream stage, or a one-line error saying what to run."""
    manifest = read_manifest(stage_dir)
    if not manifest or manifest.get("status") != "completed":
        raise StageError(f"{stage_dir} is not a completed stage ({hint})")
    return manifest


@dataclass
class StageRun:
    """One execution of a stage: owns its folder and its manifest."""

    stage: str
    dir: Path
    config: dict
    seed: int
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    start_time: str = field(default_factory=now_iso)

    def add_input(self, name: str, path: str | Path) -> Path:
        path = Path(path)
        self.inputs[name] = {"path": str(path), "sha256": sha256_path(path)}
        return path

    def add_output(self, name: str, path: str | Path) -> Path:
        self.outputs[name] = str(path)
        return Path(path)

    def _manifest(self, status: str, error: str | None = None) -> dict:
        manifest = {
            "stage": self.stage,
            "status": status,
            "start_time": self.start_time,
            "end_time": None if status == "running" else now_iso(),
            "duration_s": None if status == "running" else round(time.time() - self.started, 2),
            "command": shlex.join([sys.executable, *sys.argv]),
            "seed": self.seed,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "environment": environment_info(),
            **self.extra,
        }
        gpu = gpu_memory()
        if gpu is not None:
            manifest["gpu_memory"] = gpu
        if error:
            manifest["error"] = error
        return manifest

    def write(self, status: str, error: str | None = None) -> None:
        write_json_atomic(self.dir / MANIFEST, self._manifest(status, error))


def previous_dir(stage_dir: Path) -> Path:
    """Where a completed stage waits while a new run replaces it: a hidden sibling of its folder."""
    return stage_dir.parent / f".{stage_dir.name}.previous"


def is_stage_folder(folder: str | Path, stage: str) -> bool:
    """Provably a folder this stage wrote: it holds a manifest.json of this project naming this stage."""
    manifest = read_manifest(folder)
    return isinstance(manifest, dict) and manifest.get("stage") == stage and "status" in manifest


def enclosing_stage(path: str | Path) -> Path | None:
    """The stage folder path would be inside (a folder above it holding a manifest.json of this project), by its
    path as given and as resolved through links; None when there is none."""
    path = Path(path)
    for parents in (path.absolute().parents, path.resolve().parents):
        for parent in parents:
            if read_manifest(parent) is not None:
                return parent
    return None


def nested_stage(folder: Path) -> Path | None:
    """A stage folder somewhere inside folder (a manifest.json of this project below its top), or None."""
    for manifest in folder.rglob(MANIFEST):
        if manifest.parent != folder and read_manifest(manifest.parent) is not None:
            return manifest.parent
    return None


def remove_stage_folder(folder: Path) -> None:
    """Delete one of this stage's own folders, refusing if another stage's folder has come to be inside it."""
    inner = nested_stage(folder)
    if inner is not None:
        raise StageError(f"{folder} holds the folder of another stage ({inner}); move that out first "
                         f"(nothing was deleted)")
    remove_folder_manifest_last(folder, MANIFEST)


def refuse_foreign_folder(stage_dir: Path, stage: str) -> None:
    """The read-only half of the folder rule: a StageError unless stage_dir is new, empty or this stage's own,
    with nothing of anyone else's at its .previous place, and not inside another stage's folder."""
    if stage_dir.is_symlink() or (stage_dir.exists() and not stage_dir.is_dir()):
        raise StageError(f"{stage_dir} is not a folder a stage can write to (a file or a symbolic link)")
    outer = enclosing_stage(stage_dir)
    if outer is not None:
        raise StageError(f"{stage_dir} is inside the folder of another stage ({outer}), which replacing that stage "
                         f"would delete; choose an --output_dir / --run_id outside it (nothing was changed)")
    previous = previous_dir(stage_dir)
    if previous.is_symlink() or (previous.exists() and not is_stage_folder(previous, stage)):
        raise StageError(f"{previous} exists and is not a folder of {stage}; move it away first")
    if stage_dir.is_dir() and any(stage_dir.iterdir()) and not is_stage_folder(stage_dir, stage):
        other = read_manifest(stage_dir)
        what = f"the folder of another stage ({other['stage']})" if other else \
            f"not empty and holds no readable {MANIFEST} of {stage}"
        raise StageError(f"{stage_dir} is {what}: a stage only replaces its own folder; choose a new or "
                         f"empty --output_dir (nothing was changed)")


def prepare_stage_dir(stage_dir: str | Path, stage: str, overwrite: bool, keep_partial: bool = True) -> Path:
    """Make a stage folder ready, by the one rule every stage follows: a stage only ever deletes or replaces a
    folder that is provably its own (is_stage_folder) or empty; anything else is refused and left untouched.

    - new or empty: used, unless it lies inside another stage's folder (which that stage may replace);
    - this stage's, unfinished (running / failed): kept when keep_partial (so a stage can resume from its
      checkpoints), cleared otherwise;
    - this stage's, completed: refused without overwrite; with it, moved aside to previous_dir() until the new
      run completes (stage_run deletes it then, or moves it back if the new run fails);
    - anything else (the user's files, another stage's folder, the repository): refused;
    - a folder of this stage that holds another stage's folder is never deleted.
    The caller holds the folder's lock (stage_run), so no other stage changes it meanwhile.
    """
    stage_dir = Path(stage_dir)
    refuse_foreign_folder(stage_dir, stage)
    previous = previous_dir(stage_dir)
    if stage_dir.is_dir() and any(stage_dir.iterdir()):
        if is_completed(stage_dir):
            if not overwrite:
                raise StageError(f"{stage_dir} already holds a completed stage; pass --overwrite to replace it, "
                                 f"or choose another --run_id / --output_dir")
            inner = nested_stage(stage_dir)
            if inner is not None:
                raise StageError(f"{stage_dir} holds the folder of another stage ({inner}); move that out before "
                                 f"replacing it (nothing was changed)")
            if previous.exists():
                remove_stage_folder(previous)  # an older result left by an interrupted replacement
            os.replace(stage_dir, previous)
        elif not keep_partial:
            remove_stage_folder(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir


class stage_run:
    """Context manager: manifest 'running' on entry, 'completed' or 'failed' (with the error) on exit.

    The main process holds the folder's lock (utils.files.FolderLock) from before it prepares the folder until
    its result is settled, so two stages (single scripts or the driver's) never write one folder at once.
    Under several processes (utils.processes) only the main one prepares the folder and writes the manifest; the
    others wait until the folder is ready and get a StageRun that records inputs and outputs but writes nothing."""

    def __init__(self, stage: str, stage_dir: str | Path, config: dict, seed: int, overwrite: bool = False,
                 keep_partial: bool = True):
        self.writes = processes.is_main()
        self.lock = None
        if self.writes:
            refuse_foreign_folder(Path(stage_dir), stage)  # before the lock file beside it is made
            self.lock = FolderLock(stage_dir).__enter__()
        try:
            folder = prepare_stage_dir(stage_dir, stage, overwrite, keep_partial) if self.writes else Path(stage_dir)
        except BaseException:
            if self.lock is not None:
                self.lock.__exit__()
            raise
        processes.wait_for_everyone()
        self.run = StageRun(stage=stage, dir=folder, config=config, seed=seed)
        self.previous = previous_dir(self.run.dir)

    def __enter__(self) -> StageRun:
        if not self.writes:
            return self.run
        try:
            self.run.write("running")
            # Everything the stage logs also goes to <stage>/logs/stage.log.
            log_file = self.run.dir / "logs" / "stage.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_handler = logging.StreamHandler(open_no_follow(log_file, append=True, text=True))
        except BaseException:  # (a read-only folder, a full disk): the result it was to replace comes back
            try:
                if self.previous.exists():
                    remove_stage_folder(self.run.dir)
                    os.replace(self.previous, self.run.dir)
            finally:
                self.lock.__exit__()
            raise
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(self.log_handler)
        return self.run

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.writes:
            return False
        try:
            self._settle(exc_type, exc)
        finally:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            self.lock.__exit__()
        return False

    def _settle(self, exc_type, exc) -> None:
        if exc is None:
            self.run.write("completed")
        else:
            detail = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self._log_to_file(f"stage failed: {detail}")  # the terminal gets main_guard's one error: line
            self.run.write("failed", error=detail)
        if self.previous.exists():
            if exc is None:  # the new result is complete: the one it replaces can go
                remove_stage_folder(self.previous)
            else:  # the new run failed: the completed result it was to replace comes back
                self._log_to_file(f"the earlier completed result in {self.run.dir} is kept")
                logging.getLogger().removeHandler(self.log_handler)
                self.log_handler.close()
                remove_stage_folder(self.run.dir)
                os.replace(self.previous, self.run.dir)

    def _log_to_file(self, message: str) -> None:
        self.log_handler.handle(logging.LogRecord("finqa_rl", logging.ERROR, __file__, 0, message, None, None))
