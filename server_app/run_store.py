"""A run on the server's disk: its config, per-round log, checkpoints, and resume.

Layout under ``<output-dir>/<run-name>/``: ``config.json`` (the validated run config),
``rounds.jsonl`` (one JSON row per client and round, appended after every round),
``outcomes.jsonl`` (one JSON line per round: the clients selected, those whose replies counted,
those excluded with the reason, those that did not reply in time),
``checkpoints/round-NNNN/{state.safetensors,state.json}`` written atomically and named by
``checkpoints/LATEST``. A fresh run moves an older run of the same name aside; ``resume``
continues after the newest checkpoint and refuses a config that changed anything but the keys
in :data:`RESUME_IGNORED_KEYS`. While a ServerApp has the run open it holds an exclusive lock on
``<output-dir>/.<run-name>.lock`` (beside the folder, which a fresh run may move), so a second
ServerApp of the same run stops with one error instead of writing into the same files. Closing the
run removes the lock file while still holding the lock; one left by a killed process is taken over
by the next run (the operating system releases the lock however the process ends).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fedmosaic_core.storage import (
    atomic_write_text,
    json_safe,
    prune_rounds,
    read_snapshot,
    write_snapshot,
)
from fedmosaic_flower.config import FederationConfig

log = logging.getLogger("fedmosaic.server")

LOG_FILE = "rounds.jsonl"
OUTCOMES_FILE = "outcomes.jsonl"
RESUME_IGNORED_KEYS = {"resume", "num_server_rounds", "round_timeout"}


class RunStateError(RuntimeError):
    """The run directory does not fit the requested run (e.g. resume with another config)."""


class RunStore:
    """The run directory of one federation run."""

    def __init__(self, config: FederationConfig, keep: int = 2) -> None:
        self.config = config
        self.dir = config.run_dir
        self.keep = keep
        self.rows: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        self._lock: int | None = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lock_path(self) -> Path:
        return self.dir.parent / f".{self.dir.name}.lock"

    def _claim(self) -> None:
        """Take the run's lock, or raise naming the process that holds it."""
        if self._lock is not None:
            return
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunStateError(f"{self.dir} is in use by another ServerApp (pid {holder}); stop that run "
                                    f"or give this one another run-name") from None
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)  # its holder removed the file between our open and our flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def close(self) -> None:
        """Release the run's lock and remove its file (the run's files stay)."""
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)  # while locked, so no one holds a lock on a removed file
            os.close(self._lock)  # closing the descriptor releases its flock
            self._lock = None

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def outcomes_path(self) -> Path:
        return self.dir / OUTCOMES_FILE

    def open(self) -> tuple[int, tuple[dict[str, torch.Tensor], dict[str, Any]] | None]:
        """Fresh run or resume: (first round to run, the checkpoint to restore or None). Takes the
        run's lock first (:class:`RunStateError` while another ServerApp holds it)."""
        self._claim()
        saved_config = self.dir / "config.json"
        if self.config.resume:
            checkpoint = self.latest_checkpoint()
            if checkpoint is not None:
                previous = json.loads(saved_config.read_text()) if saved_config.exists() else {}
                mine = self.config.model_dump()
                changed = sorted(
                    k for k in mine if k not in RESUME_IGNORED_KEYS and k in previous and previous[k] != mine[k]
                )
                if changed:
                    raise RunStateError(f"resume: {self.dir} was run with different values for {', '.join(changed)}")
                server_round, tensors, meta = checkpoint
                self.rows = [r for r in _read_lines(self.log_path) if int(r.get("round", 0)) <= server_round]
                self.outcomes = [o for o in _read_lines(self.outcomes_path) if int(o.get("round", 0)) <= server_round]
                for path, records in ((self.log_path, self.rows), (self.outcomes_path, self.outcomes)):
                    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
                log.info("resuming %s after round %d", self.dir, server_round)
                return server_round + 1, (tensors, meta)
            log.info("resume: no checkpoint in %s, starting at round 1", self.dir)
        elif (self.dir / "checkpoints").exists():
            archive = self.dir.with_name(f"{self.dir.name}-previous-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(self.dir), str(archive))
            log.info("a previous run of %s was moved to %s", self.dir.name, archive)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        self.outcomes_path.unlink(missing_ok=True)
        atomic_write_text(saved_config, json.dumps(self.config.model_dump(), indent=1, sort_keys=True))
        return 1, None

    def record_round(
        self, server_round: int, rows: list[dict[str, Any]], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
        outcome: dict[str, Any] | None = None,
    ) -> None:
        """Append the round's rows (and its outcome line) to the logs, then checkpoint the server state."""
        safe = [json_safe(r) for r in rows]
        _append_lines(self.log_path, safe)
        self.rows.extend(safe)
        if outcome is not None:
            line = json_safe(outcome)
            _append_lines(self.outcomes_path, [line])
            self.outcomes.append(line)
        root = self.dir / "checkpoints"
        final = write_snapshot(root / f"round-{server_round:04d}", "state", tensors, {"round": server_round, **meta})
        atomic_write_text(root / "LATEST", final.name + "\n")
        prune_rounds(root, self.keep)

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """(round, tensors, meta) of the newest complete checkpoint, or None when there is none."""
        pointer = self.dir / "checkpoints" / "LATEST"
        if not pointer.exists():
            return None
        tensors, meta = read_snapshot(pointer.parent / pointer.read_text().strip(), "state")
        return int(meta["round"]), tensors, meta


def _append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-append
    return records


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
