import json

import pytest

from aloe.errors import AloeError
from aloe.models import ensure_local_model, gguf_path, hf_location, model_identity, resolve_model


def test_registry_has_paper_models():
    ids = {n: resolve_model(n).hf_id for n in ("llama3-8b", "mistral-7b", "qwen2-7b", "olmo-7b")}
    assert ids == {"llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
                   "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
                   "qwen2-7b": "Qwen/Qwen2-7B-Instruct", "olmo-7b": "allenai/OLMo-7B-0724-Instruct-hf"}


@pytest.mark.slow
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
    assert list((tmp_path / "models").iterdir()) == []


def test_gguf_is_found():
    p = gguf_path(resolve_model("smollm2-135m"))
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000
