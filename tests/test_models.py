import json

import pytest

from aloe.errors import AloeError
from aloe.models import ensure_local_model, gguf_path, hf_location, model_identity, resolve_model


def test_registry_has_paper_models():
    ids = {n: resolve_model(n).hf_id for n in ("llama3-8b", "mistral-7b", "qwen2-7b", "olmo-7b")}
    assert ids == {
        "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
        "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
        "qwen2-7b": "Qwen/Qwen2-7B-Instruct",
        "olmo-7b": "allenai/OLMo-7B-0724-Instruct-hf",
    }


@pytest.mark.integration
def test_converted_folder_loads_saves_and_matches_gguf(tmp_path):
    """The converted folder is plain HF (no GGUF quantizer marker): it saves, reloads, trains."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve_model("smollm2-135m")
    folder = ensure_local_model(spec)
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits
    model.save_pretrained(tmp_path / "copy")  # what the GGUF-loaded model refuses
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert torch.allclose(before, again(ids).logits)
    # the local copy is accepted as a model and gets its own identity for the cache
    local = resolve_model(str(tmp_path / "copy"))
    assert local.source == "local" and hf_location(local) == str((tmp_path / "copy").resolve())
    assert model_identity(local)[1] != model_identity(spec)[1]


def test_no_disk_space_leaves_nothing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setenv("ALOE_MODELS_DIR", str(tmp_path / "models"))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**7, 10**7))
    with pytest.raises(AloeError, match="not enough disk space.*ALOE_MODELS_DIR"):
        ensure_local_model(resolve_model("smollm2-135m"))
    assert [p.name for p in (tmp_path / "models").iterdir()] in ([], [".convert.lock"])


def test_gguf_is_found():
    p = gguf_path(resolve_model("smollm2-135m"))
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000


def test_hub_revision_resolves_to_a_commit(tmp_path, monkeypatch):
    """Cache keys name a hub model's commit, not its moving branch: read from the local hub cache's
    refs (what an offline load uses); unresolvable offline, it is marked, never passed off as a commit."""
    from aloe.models import resolve_hf_commit

    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "models--org--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit + "\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hf_commit("org/name", None, tmp_path) == commit
    assert resolve_hf_commit("org/name", "main", tmp_path) == commit
    assert resolve_hf_commit("org/name", commit, tmp_path) == commit  # already a commit
    assert resolve_hf_commit("org/name", "v2", tmp_path) is None  # offline and not cached
    assert resolve_hf_commit("org/other", None, tmp_path) is None


def _fake_parts(tmp_path, monkeypatch, chunks):
    """Packages fakepart_1..n on sys.path, each holding data/partNN.bin, like the PyPI parts."""
    import hashlib

    from aloe.models import ModelSpec

    for n, data in enumerate(chunks, 1):
        d = tmp_path / "site" / f"fakepart_{n}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    blob = b"".join(chunks)
    parts = {
        "package": "fake-part{n}",
        "module": "fakepart_{n}",
        "version": "1.0",
        "parts": len(chunks),
        "part_file": "data/part{n:02d}.bin",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    return ModelSpec("fake", "gguf-parts", parts=parts), blob


def test_split_gguf_is_assembled_in_order_and_checked(tmp_path, monkeypatch):
    import dataclasses

    from aloe.errors import AloeError
    from aloe.models import assemble_gguf, part_requirements

    spec, blob = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    out = assemble_gguf(spec, tmp_path / "m" / "fake.gguf")
    assert out.read_bytes() == blob and not list((tmp_path / "m").glob("*.tmp"))
    assert part_requirements(spec) == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    # a wrong pin: refused, nothing left behind
    bad = dataclasses.replace(spec, parts={**spec.parts, "sha256": "0" * 64})
    with pytest.raises(AloeError, match=r"does not match its pins .*a part is corrupt or from another version"):
        assemble_gguf(bad, tmp_path / "m2" / "fake.gguf")
    assert not (tmp_path / "m2" / "fake.gguf").exists() and not list((tmp_path / "m2").glob("*.tmp"))
    assert [p.name for p in (tmp_path / "m2").iterdir()] == [".convert.lock"]
    # a killed earlier assembly's temp file is deleted before the next one starts
    (tmp_path / "m4").mkdir()
    (tmp_path / "m4" / ".fake.gguf.12345.tmp").write_bytes(b"half")
    assemble_gguf(spec, tmp_path / "m4" / "fake.gguf")
    assert sorted(p.name for p in (tmp_path / "m4").iterdir()) == [".convert.lock", "fake.gguf", "fake.gguf.sha256"]
    # a missing part: named, with the command that installs every part
    missing = dataclasses.replace(spec, parts={**spec.parts, "parts": 4})
    with pytest.raises(AloeError, match=r"part 4 of 4 is missing: the pip package fake-part4==1.0 is not installed"):
        assemble_gguf(missing, tmp_path / "m3" / "fake.gguf")


def test_converting_a_split_gguf_assembles_it_under_the_same_lock(tmp_path, monkeypatch):
    """Converting a split GGUF assembles it first, inside the conversion lock: the lock must be
    reentrant, or the process waits for itself forever (a fresh `make run` hung there). The
    fake parts are no real GGUF, so the conversion itself then fails, with the file assembled."""
    import threading

    from aloe.models import ensure_local_model

    spec, blob = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50])
    monkeypatch.setenv("ALOE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr("aloe.models._CONVERT_BYTES_NEEDED", 0)
    outcome = {}

    def convert():
        try:
            ensure_local_model(spec)
        except Exception as e:  # noqa: BLE001 - any end is fine here; hanging is the failure
            outcome["error"] = e

    t = threading.Thread(target=convert, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "ensure_local_model deadlocked on its own conversion lock"
    assert (tmp_path / "models" / "fake.gguf").read_bytes() == blob
    assert "error" in outcome and not (tmp_path / "models" / "fake-hf").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".fake-hf.")]


def test_registry_pins_the_embedded_teachers():
    from aloe.models import resolve_model

    for name, parts in (("qwen2.5-coder-0.5b", 6), ("qwen2.5-coder-1.5b", 22)):
        spec = resolve_model(name)
        assert spec.source == "gguf-parts" and spec.parts["parts"] == parts and len(spec.parts["sha256"]) == 64
