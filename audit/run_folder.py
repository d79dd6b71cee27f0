"""The run folder as a transaction: a run either replaces the earlier one whole, or leaves it alone.

A run writes into a staging folder and swaps it into place only once results and reports are
complete, so an interrupt, a kill or a late error never costs the earlier complete run. Everything
the transaction needs lives in one hidden folder beside the destination, on the same file system
(renames are atomic there):

    reports/demo/                       the run (what `--out` names)
    reports/.demo.model-audit/lock      flock'ed by the run writing reports/demo (released by the kernel
                                        when the process dies, so a killed run never leaves it held)
    reports/.demo.model-audit/staging/  the run being written: the run-folder layout (audit.store) plus
                                        STAGING, which records what is being audited and whether the run
                                        is complete. A later resume can adopt its finished chunks when the
                                        record matches; today a new run starts it afresh.
    reports/.demo.model-audit/previous/ the earlier run, renamed aside during the swap, removed after it

The swap: destination -> previous, staging -> destination, the files the tool did not write moved
from previous into the new run, previous removed. A run that finds a half-done swap finishes it (or,
when the staging folder was not complete, puts the earlier run back) before anything else.

The tool never deletes a file it did not write: a non-empty destination that is not a model-audit
run is refused unless `force`, and then, like any file a user added to a run folder, what it holds
is carried into the new run.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from audit.errors import InputError
from audit.store import RESULTS, RUN_ENTRIES, atomic_write, dumps

MARKER = ".model-audit-run"  # in every run folder: says it is one, so a later run may replace it
STAGING = "STAGING.json"  # in the staging folder: what is being audited, and whether it is complete


class RunFolderError(InputError):
    """The destination cannot take a run (foreign files, a concurrent run); the message says why."""


def is_run_folder(path: Path) -> bool:
    """A folder a model-audit run wrote: it holds the marker, or (runs before the marker) a results.json
    of model-audit."""
    if (path / MARKER).is_file():
        return True
    try:
        return json.loads((path / RESULTS).read_text(encoding="utf-8"))["tool"]["name"] == "model-audit"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def foreign_entries(path: Path) -> list[str]:
    """The entries of a folder that no run writes (a user's notes, the demo's inputs of earlier layouts)."""
    return sorted(e.name for e in path.iterdir() if e.name not in RUN_ENTRIES and e.name != MARKER)


class RunFolder:
    """`with RunFolder(out) as folder:` write into `folder.staging`, then `folder.commit()`.

    Leaving the block without commit keeps the earlier run as it was; the lock is released either way.
    """

    def __init__(self, destination: Path, force: bool = False, record: dict[str, Any] | None = None) -> None:
        self.destination = Path(destination)
        self.force = force
        self.record = record or {}
        self.home = self.destination.parent / f".{self.destination.name}.model-audit"
        self.staging = self.home / "staging"
        self.previous = self.home / "previous"
        self._lock_fd: int | None = None

    def __enter__(self) -> RunFolder:
        self._check_destination()
        self.acquire()
        try:
            self.repair()
            self._check_destination()  # the repair may have put an earlier run back
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
            (self.staging / MARKER).write_text("model-audit run folder\n", encoding="utf-8")
            self._write_state("running")
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """An input error leaves nothing behind; an interrupt or a crash keeps the staging folder, whose
        finished chunks a resume can adopt (the next run clears it otherwise)."""
        try:
            if isinstance(exc, InputError) and self.staging.exists():
                shutil.rmtree(self.staging)
        finally:
            self.release()

    def acquire(self) -> None:
        """Hold the destination's lock, or say who holds it."""
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunFolderError(f"{self.destination}: cannot create the run's lock in {self.home} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.destination}: another model-audit run is writing this folder ({holder}); "
                                 "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _check_destination(self) -> None:
        dest = self.destination
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise RunFolderError(f"{dest}: --out must be a folder (this is a {'symlink' if dest.is_symlink() else 'file'})")
        if dest.is_dir() and not self.force and any(dest.iterdir()) and not is_run_folder(dest):
            raise RunFolderError(f"{dest}: folder is not empty and is not a model-audit run; "
                                 "choose another --out, or pass --force to add the run to it (nothing in it is deleted)")

    def _write_state(self, state: str) -> None:
        atomic_write(self.staging / STAGING, dumps({"tool": "model-audit", "state": state,
                                                    "destination": str(self.destination), **self.record}))

    def _staging_complete(self) -> bool:
        try:
            return json.loads((self.staging / STAGING).read_text(encoding="utf-8")).get("state") == "complete"
        except (OSError, ValueError, AttributeError):
            return False

    def commit(self) -> Path:
        """Swap the complete staging folder into place; returns the destination."""
        self._write_state("complete")
        if self.destination.exists():
            os.rename(self.destination, self.previous)
        self._finish_swap()
        return self.destination

    def _finish_swap(self) -> None:
        if self.staging.exists() and not self.destination.exists():
            os.rename(self.staging, self.destination)
            (self.destination / STAGING).unlink(missing_ok=True)
        if self.previous.exists():
            for name in foreign_entries(self.previous):
                target = self.destination / name
                if not target.exists():
                    os.rename(self.previous / name, target)
            shutil.rmtree(self.previous)

    def repair(self) -> None:
        """Finish or undo a swap a killed run left half done (the lock is held)."""
        if self.previous.exists():
            if self.destination.exists() or self._staging_complete():
                self._finish_swap()
            else:
                os.rename(self.previous, self.destination)
        elif self._staging_complete():
            self.commit()
