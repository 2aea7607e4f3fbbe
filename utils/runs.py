"""Run folders and stage manifests (DESIGN.md: "Stages and their folders").

Every stage writes outputs/<run_id>/<stage folder>/manifest.json: status running -> completed | failed, times,
command line, resolved config, seed, inputs with sha256, outputs, headline metrics and the environment.
Manifests are written atomically (temp file + rename), so a reader never sees half a manifest, and a folder
whose manifest does not say completed is not a finished stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.stages import REPO_ROOT, STAGE_FOLDERS  # noqa: F401  (the run layout, declared in utils/stages.py)
from utils import processes

MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A problem with a stage's inputs or outputs, reported as one line."""


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (its files' relative paths and hashes, in order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise StageError(f"input not found: {path}")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
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
    elif torch.cuda.is_available():
        info["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return info


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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


def _clear(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir(parents=True)


def prepare_stage_dir(stage_dir: str | Path, stage: str, overwrite: bool, keep_partial: bool = True) -> Path:
    """Make a stage folder ready, by the one rule every stage follows: a stage only ever deletes or replaces a
    folder that is provably its own (is_stage_folder) or empty; anything else is refused and left untouched.

    - new or empty: used;
    - this stage's, unfinished (running / failed): kept when keep_partial (so a stage can resume from its
      checkpoints), cleared otherwise;
    - this stage's, completed: refused without overwrite; with it, moved aside to previous_dir() until the new
      run completes (stage_run deletes it then, or moves it back if the new run fails);
    - anything else (the user's files, another stage's folder, the repository): refused.
    """
    stage_dir = Path(stage_dir)
    if stage_dir.is_symlink() or (stage_dir.exists() and not stage_dir.is_dir()):
        raise StageError(f"{stage_dir} is not a folder a stage can write to (a file or a symbolic link)")
    previous = previous_dir(stage_dir)
    if previous.exists() and not is_stage_folder(previous, stage):
        raise StageError(f"{previous} exists and is not a folder of {stage}; move it away first")
    if stage_dir.is_dir() and any(stage_dir.iterdir()):
        if not is_stage_folder(stage_dir, stage):
            other = read_manifest(stage_dir)
            what = f"the folder of another stage ({other.get('stage')})" if isinstance(other, dict) and \
                other.get("stage") else f"not empty and holds no {MANIFEST} of {stage}"
            raise StageError(f"{stage_dir} is {what}: a stage only replaces its own folder; choose a new or "
                             f"empty --output_dir (nothing was changed)")
        if is_completed(stage_dir):
            if not overwrite:
                raise StageError(f"{stage_dir} already holds a completed stage; pass --overwrite to replace it, "
                                 f"or choose another --run_id / --output_dir")
            if previous.exists():
                shutil.rmtree(previous)  # an older result left by an interrupted replacement
            os.replace(stage_dir, previous)
        elif not keep_partial:
            _clear(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir


class stage_run:
    """Context manager: manifest 'running' on entry, 'completed' or 'failed' (with the error) on exit.

    Under several processes (utils.processes) only the main one prepares the folder and writes the manifest; the
    others wait until the folder is ready and get a StageRun that records inputs and outputs but writes nothing."""

    def __init__(self, stage: str, stage_dir: str | Path, config: dict, seed: int, overwrite: bool = False,
                 keep_partial: bool = True):
        self.writes = processes.is_main()
        folder = prepare_stage_dir(stage_dir, stage, overwrite, keep_partial) if self.writes else Path(stage_dir)
        processes.wait_for_everyone()
        self.run = StageRun(stage=stage, dir=folder, config=config, seed=seed)
        self.previous = previous_dir(self.run.dir)

    def __enter__(self) -> StageRun:
        if not self.writes:
            return self.run
        self.run.write("running")
        # Everything the stage logs also goes to <stage>/logs/stage.log.
        log_file = self.run.dir / "logs" / "stage.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_handler = logging.FileHandler(log_file)
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(self.log_handler)
        return self.run

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.writes:
            return False
        if exc is None:
            self.run.write("completed")
        else:
            detail = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            self._log_to_file(f"stage failed: {detail}")  # the terminal gets main_guard's one error: line
            self.run.write("failed", error=detail)
        if self.previous.exists():
            if exc is None:  # the new result is complete: the one it replaces can go
                shutil.rmtree(self.previous)
            else:  # the new run failed: the completed result it was to replace comes back
                self._log_to_file(f"the earlier completed result in {self.run.dir} is kept")
                logging.getLogger().removeHandler(self.log_handler)
                self.log_handler.close()
                shutil.rmtree(self.run.dir)
                os.replace(self.previous, self.run.dir)
        logging.getLogger().removeHandler(self.log_handler)
        self.log_handler.close()
        return False

    def _log_to_file(self, message: str) -> None:
        self.log_handler.handle(logging.LogRecord("finqa_rl", logging.ERROR, __file__, 0, message, None, None))
