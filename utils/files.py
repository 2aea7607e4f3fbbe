"""Reading and writing files without losing anything: the lowest layer every stage's writes go through.

- Every file is written whole or not at all (a temp file beside it, then a rename), with the mode a plain
  open() would give (mkstemp's 0600 would lock other users out of processed data and results), and a rename
  replaces a symbolic link itself, never the file it points to.
- A file that is written in place (a stage log streamed as it runs) is opened without following links.
- A JSON file that cannot be read (missing, not UTF-8, not JSON, integers too long for Python, nested too deep)
  is one StageError naming it; so is a write the system refuses (read-only folder, disk full, file too large).
- A stage's lock is an flock on a hidden empty file beside its folder; the kernel drops it when the process
  dies, even by kill -9, and the file is never written, truncated or deleted.
- A stage folder is deleted manifest last, so a deletion killed halfway leaves a folder that is still provably
  the stage's own (its manifest.json names it) and the next run can finish the job.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TextIO


class StageError(RuntimeError):
    """A problem with a stage's inputs or outputs, reported as one line."""


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_mode()  # what open(path, "w") would create (umask read once: os.umask has no getter)


def os_error_text(err: OSError) -> str:
    """'[Errno 28] No space left on device' without the file name (the caller names the file)."""
    return f"{err.strerror or type(err).__name__}" + (f" (errno {err.errno})" if err.errno else "")


def write_atomic(path: str | Path, write: Callable[[TextIO], None]) -> None:
    """Write path whole or not at all: write(handle) fills a temp file beside it, which then replaces path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise StageError(f"cannot write {path}: {os_error_text(err)}") from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StageError(f"cannot write {path}: {os_error_text(err)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    def write(handle: TextIO) -> None:
        json.dump(obj, handle, indent=2, default=str)
        handle.write("\n")
    write_atomic(path, write)


def open_no_follow(path: str | Path, append: bool = False, text: bool = False):
    """A file opened for writing that is never a symbolic link's target (a link there is refused)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        raise StageError(f"cannot write {path}: {os_error_text(err)}") from None
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8") if text else os.fdopen(fd, "ab" if append else "wb")


def read_json(path: str | Path, what: str = "JSON") -> Any:
    """The JSON in path, or one StageError naming the file and why it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: file not found") from None
    except OSError as err:
        raise StageError(f"{path}: cannot read it ({os_error_text(err)})") from None
    except UnicodeDecodeError:
        raise StageError(f"{path}: not a readable {what} file (not UTF-8)") from None
    except RecursionError:
        raise StageError(f"{path}: not a readable {what} file (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, and integers past Python's digit limit
        raise StageError(f"{path}: not a readable {what} file ({str(err).splitlines()[0][:200]})") from None


def expands_beyond(obj: Any, limit: int) -> bool:
    """Whether obj, with every shared reference written out (as json.dump would), has more than limit values.
    A YAML alias bomb is a few hundred bytes that expand to billions: counted only up to limit."""
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return False


class FolderLock:
    """An exclusive, non-blocking lock on a folder that is about to be written: an flock on a hidden empty file
    (default: `.<name>.lock` beside the folder). The lock file is opened without following links and is never
    written or removed, so it holds no one's data and no two processes can race into two lock files."""

    def __init__(self, folder: str | Path, lock_file: str | Path | None = None, busy: str | None = None):
        self.folder = Path(folder)
        self.path = Path(lock_file) if lock_file else self.folder.parent / f".{self.folder.name}.lock"
        self.busy = busy or f"{self.folder} is being written by another process"
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise StageError(f"cannot lock {self.folder} ({self.path}: {os_error_text(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StageError(f"{self.busy} (it holds the lock {self.path}); wait for it to finish "
                             f"(nothing was changed)") from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def remove_folder_manifest_last(folder: str | Path, manifest: str = "manifest.json") -> None:
    """Delete a stage folder so that a kill at any instant leaves it either whole-enough to be recognised (its
    manifest still there) or gone: everything else first, then the manifest, then the empty folder."""
    folder = Path(folder)
    for child in list(folder.iterdir()):
        if child.name == manifest:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / manifest).unlink(missing_ok=True)
    folder.rmdir()
