"""Backends: one interface (:class:`ChatBackend`), three engines, chosen by config.

``open_backend(config, cache_path)`` is the only constructor the stages use; the
registry below maps a config ``kind`` to its builder, so adding an engine does not
touch any stage.
"""

from __future__ import annotations

from typing import Callable

from aloe.backends.base import (
    CandidateLogprobs,
    ChatBackend,
    ChatRequest,
    Completion,
    ProbRequest,
    Sampling,
    match_candidates,
)
from aloe.cache import CallCache
from aloe.config import BackendConfig
from aloe.models import hf_location, model_identity, resolve_model

__all__ = [
    "CandidateLogprobs",
    "ChatBackend",
    "ChatRequest",
    "Completion",
    "ProbRequest",
    "Sampling",
    "match_candidates",
    "open_backend",
    "check_settings",
    "probe",
    "BACKENDS",
]


def _transformers(cfg: BackendConfig, cache: CallCache) -> ChatBackend:
    from aloe.backends.transformers_backend import TransformersBackend

    spec = resolve_model(cfg.model, cfg.revision)
    model_id, revision = model_identity(spec)
    return TransformersBackend(
        hf_location(spec),
        model_id,
        revision,
        cache,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        device=cfg.device,
        hf_revision=spec.revision if spec.source == "hf" else None,
    )


def _openai(cfg: BackendConfig, cache: CallCache | None, **overrides) -> ChatBackend:
    from aloe.backends.openai_backend import OpenAIBackend

    # The model behind a server is whatever it serves; `model` names it for the cache
    # and the manifest, `served_model` is what the API expects (defaults to `model`).
    settings = dict(
        api_key_env=cfg.api_key_env,
        allow_insecure_key=cfg.allow_insecure_key,
        max_concurrency=cfg.max_concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        top_logprobs=cfg.top_logprobs,
        deadline_s=cfg.deadline_s,
        rpm=cfg.rpm,
        tpm=cfg.tpm,
    )
    backend = OpenAIBackend(
        cfg.base_url,
        cfg.served_model or cfg.model,
        cfg.model,
        cfg.revision or "served",
        cache,
        **{**settings, **overrides},
    )
    backend.check()
    return backend


def _vllm(cfg: BackendConfig, cache: CallCache) -> ChatBackend:
    from aloe.backends.vllm_backend import VLLMBackend

    spec = resolve_model(cfg.model, cfg.revision)
    model_id, revision = model_identity(spec)
    return VLLMBackend(
        hf_location(spec),
        model_id,
        revision,
        cache,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        top_logprobs=cfg.top_logprobs,
        hf_revision=spec.revision if spec.source == "hf" else None,
        dtype=cfg.dtype,
    )


def _scripted(cfg: BackendConfig, cache: CallCache) -> ChatBackend:
    from aloe.backends.scripted import ScriptedBackend

    return ScriptedBackend(cfg.model, cfg.revision or "0", cache)


BACKENDS: dict[str, Callable[[BackendConfig, CallCache], ChatBackend]] = {
    "transformers": _transformers,
    "openai": _openai,
    "vllm": _vllm,
    "scripted": _scripted,
}


def open_backend(cfg: BackendConfig | dict, cache_path: str | None = None) -> ChatBackend:
    if isinstance(cfg, dict):
        from aloe.config import build

        cfg = build(BackendConfig, cfg, "backend")
    return BACKENDS[cfg.kind](cfg, CallCache(cache_path))


def check_settings(cfg: BackendConfig, where: str = "") -> None:
    """The engines' own rules for their settings, for ``aloe check`` before anything opens (the HTTP
    engine applies the same rules itself when it opens: :mod:`aloe.backends.http_safety`).
    ``where`` (e.g. ``"roles.judge."``) prefixes the key in the message."""
    if cfg.base_url is not None or cfg.api_key_env is not None:
        from aloe.backends.http_safety import check_settings as http_settings

        http_settings(cfg.base_url, cfg.api_key_env, cfg.allow_insecure_key, where)


def probe(cfg: BackendConfig) -> None:
    """Before a run: a served model answers and accepts the key (one quick request, no retries);
    a local engine has nothing to probe here. Raises BackendError naming the server."""
    if cfg.kind == "openai":  # the engine applies its URL and key rules as it opens
        engine = _openai(cfg, None, timeout_s=min(cfg.timeout_s, 10.0), max_retries=0)
        engine.close()
