"""One writer per experiment, and a clean start for every stage.

Two processes writing one experiment corrupt it: both append to the same JSONL files, and
the torn-line repair of one truncates what the other is writing. ``aloe run`` therefore takes
an exclusive lock on ``data/<experiment>/.lock`` (``flock``: the kernel drops it when the
holder dies, so a crash never leaves a stale lock) and a second run exits 2 naming the holder.
The notebooks it starts inherit the lock through ``ALOE_LOCK``; a stage started any other way
(a notebook opened by hand, ``python -m aloe.training``) takes it itself for as long as it runs.

Each stage also starts clean: its ``manifest.json`` (written last, the mark of a finished
stage) is removed first, so a stage that fails on a rerun no longer looks finished, and the
temp files a killed writer left behind are deleted (no other writer can exist while we hold
the lock).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from aloe.errors import AloeError

LOCK_ENV = "ALOE_LOCK"  # the lock file a parent process holds for this experiment


class ExperimentBusy(AloeError):
    """Another process holds the experiment's lock (the CLI exits 2)."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["started"]))
        return f"pid {h['pid']} on {h['host']}, started {started} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are unreadable)"


@contextmanager
def experiment_lock(root: str | Path) -> Iterator[Path]:
    """Hold ``<root>/.lock`` exclusively; ``root`` is ``data/<experiment>``. Re-entrant across
    processes through ``ALOE_LOCK`` (set for children while held)."""
    root = Path(root)
    path = (root / ".lock").resolve()
    if os.environ.get(LOCK_ENV) == str(path):  # a parent (aloe run) holds it for us
        yield path
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentBusy(
                f"experiment {root.name!r} is in use by {_holder(path)}; wait for it to finish "
                f"or stop it (lock file {path})"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        previous = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = str(path)
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = previous
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def clean_leftovers(folder: Path) -> int:
    """Delete the temp files (``.<name>.*.tmp``) a killed writer left; returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def stage(name: str) -> Callable:
    """Decorate a stage's ``run(cfg, ...)``: lock the experiment, check the data files it will read
    (aloe.paths.stage_inputs; a damaged one fails here, before anything is spent or the old
    manifest removed), remove the stage's manifest, clean leftovers, then run. Under
    ``accelerate launch`` only rank 0 does this."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(cfg, *args, **kwargs):
            if int(os.environ.get("RANK", "0")) != 0:
                return fn(cfg, *args, **kwargs)
            with experiment_lock(cfg.paths.root):
                from aloe.io import check_readable
                from aloe.paths import stage_inputs

                check_readable(f for _, f in stage_inputs(name, cfg))
                cfg.paths.manifest(name).unlink(missing_ok=True)
                clean_leftovers(cfg.paths.stage(name))
                return fn(cfg, *args, **kwargs)

        return guarded

    return wrap
