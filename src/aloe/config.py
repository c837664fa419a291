"""Typed, validated configuration.

A run is one YAML file in ``parameters/``. It is turned into frozen dataclasses
*before anything runs*; an unknown key, a wrong type or a value outside its
allowed set is a :class:`ConfigError` naming the file, the key path and what is
allowed. (Papermill alone only warns on an unknown parameter.)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from aloe.errors import ConfigError
from aloe.paths import Paths
from aloe.variants import EVALUATED, VARIANTS
from aloe.yamlfile import load_yaml, number_hint, short

# experiment names become folder names under data/ and reports/
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

STAGES = ("personas", "trees", "train", "evaluate", "report")
NOTEBOOKS = {
    "personas": "01_personas.ipynb",
    "trees": "02_trees.ipynb",
    "train": "03_train.ipynb",
    "evaluate": "04_evaluate.ipynb",
    "report": "05_report.ipynb",
}

# The parts a model plays. Each is a backend of its own (`roles:` in a parameter file,
# merged over `backend`); roles whose settings come out equal share one engine.
ROLES = ("generator", "simulator", "inferrer", "responder", "judge", "policy")
ROLE_DOCS = {
    "generator": "grows the persona pool",
    "simulator": "plays the user, in trees and in evaluation",
    "inferrer": "states what the user has revealed (trees)",
    "responder": "writes the hinted and plain replies (trees)",
    "judge": "every judgment: pair and score judges in trees, the score judge in evaluation",
    "policy": "the student: fine-tuned by train; base, oracle and reminder in evaluation",
}
# which roles each stage plays (what `aloe check` resolves and `aloe run` preflights)
STAGE_ROLES = {
    "personas": ("generator",),
    "trees": ("simulator", "inferrer", "responder", "judge"),
    "train": ("policy",),
    "evaluate": ("simulator", "judge", "policy", "responder"),
    "report": (),
}
# Settings that belong to one model: a role that names another model does not inherit them.
_MODEL_BOUND = ("revision", "served_model")
# Keys that moved: a clear message instead of "unknown key".
RETIRED = {
    ("trees", "judge"): "renamed to `pair_judge` (same values: pair, likelihood, rules); the model that judges is "
    "the judge role (roles.judge)",
    ("evaluate", "judge"): "renamed to `score_judge` (same values: paper, history, likelihood, rules); the model "
    "that judges is the judge role (roles.judge)",
    ("train", "model"): "the model that train fine-tunes is the policy role: set `roles: {policy: {model: ...}}` "
    "at the top level (roles.policy)",
}


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {short(value)} is not allowed; allowed: {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built and validated
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short(value)}")
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short(value)}")
        inner = (typing.get_args(tp) + (Any, Any))[1]
        if inner is Any:
            return dict(value)
        return {k: _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a config class
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    raise ConfigError(
        f"{where}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})"
        f"{number_hint(value) if tp in (int, float) else ''}"
    )


def build(cls: type, data: dict, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"{where + ': ' if where else ''}unknown key {short(k)}{hint}; allowed keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            key = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(data[name], hints[name], key)
            _in_range(cls, name, kwargs[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{where + ': ' if where else ''}missing required key {name!r} ({_type_name(hints[name])})"
            )
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks name the key themselves
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def param(
    default: Any = dataclasses.MISSING, *, help: str, range: tuple[float, float] | None = None, factory: Any = None
) -> Any:
    """A parameter's one declaration: its default (or ``factory``), its allowed range (inclusive; a
    typo such as `turns: 1000000000` or `gpu_memory_utilization: 5` is refused before a run starts
    instead of running for days or failing deep inside an engine) and one line of help. Validation,
    the notebooks' parameters cells and docs/parameters.md are all made from it
    (scripts/sync_notebook_defaults.py)."""
    metadata = {"help": help, **({"range": range} if range is not None else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_range(cls: type, name: str) -> tuple[float, float] | None:
    return cls.__dataclass_fields__[name].metadata.get("range")


def check_ranges(obj: Any) -> None:
    """Every field of a built config within its declared range (also when a config is made
    directly, not from a file); raises with the bare key, which build() prefixes with the path."""
    for f in dataclasses.fields(obj):
        _in_range(type(obj), f.name, getattr(obj, f.name), f.name)


def _in_range(cls: type, name: str, value: Any, key: str) -> None:
    bounds = field_range(cls, name)
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = bounds
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {lo:g} to {hi:g}")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BackendConfig:
    """Which engine answers LLM calls. One shape for all three kinds."""

    # scripted: canned deterministic answers (aloe.backends.scripted), for tests and dry runs
    kind: Literal["transformers", "openai", "vllm", "scripted"] = param(
        "transformers",
        help="the engine: transformers (local), openai (any OpenAI-compatible server), vllm (GPU) or scripted (canned answers, for tests)",
    )
    model: str = param("smollm2-135m", help="registry name (parameters/models.yaml), HF id or local folder")
    revision: Optional[str] = param(None, help="HF revision; part of the cache key")
    # transformers
    batch_size: int = param(8, help="requests per batch on a local engine (transformers)", range=(1, 4096))
    dtype: Literal["auto", "bfloat16", "float32", "float16", "autocast-bf16", "int8"] = param(
        "auto",
        help="weights' dtype on a local engine (auto: bf16 where the CPU or GPU has it; int8: dynamic int8 on CPU, transformers only)",
    )
    device: Literal["auto", "cpu", "cuda"] = param("auto", help="where a local model runs")
    # openai-compatible HTTP
    base_url: Optional[str | tuple[str, ...]] = param(None, help="one URL, or a list for a pool of servers")
    api_key_env: Optional[str] = param(None, help="name of the environment variable holding the key")
    # the key goes only to https URLs or to http on this machine (loopback); true also sends it
    # over plain http to another host, where anyone on the path can read it
    allow_insecure_key: bool = param(
        False, help="true also sends the key over plain http to another host, where anyone on the path can read it"
    )
    served_model: Optional[str] = param(None, help="model name the server expects; defaults to `model`")
    max_concurrency: int = param(8, help="HTTP: requests in flight at once on each server of the pool", range=(1, 1024))
    timeout_s: float = param(120.0, help="one attempt", range=(0.1, 86400))
    max_retries: int = param(
        6, help="retries of a failed HTTP request (429, 5xx, timeouts), with backoff", range=(0, 100)
    )
    deadline_s: Optional[float] = param(
        None, help="one request, retries and waits included (None: timeout_s x tries + 60)", range=(1, 604800)
    )
    rpm: Optional[float] = param(
        None,
        help="HTTP: requests per minute at most, across the pool (a provider's tier limit); None: no limit",
        range=(1, 10000000),
    )
    tpm: Optional[float] = param(
        None,
        help="HTTP: tokens per minute at most (prompt, estimated at 4 characters a token, plus max_tokens); None: no limit",
        range=(100, 1000000000),
    )
    # vllm
    tensor_parallel_size: int = param(1, help="vLLM: GPUs one engine spans", range=(1, 1024))
    gpu_memory_utilization: float = param(
        0.85, help="vLLM: share of the GPU's memory the engine may take", range=(0.05, 1.0)
    )
    max_model_len: Optional[int] = param(
        None, help="vLLM: context length (prompt and reply); None: the model's", range=(16, 10000000)
    )
    enable_prefix_caching: bool = param(
        True,
        help="vLLM: reuse the KV cache of a prompt prefix seen before (the same persona and history, a judge asked in both orders); set explicitly, not left to vLLM's default",
    )
    enforce_eager: bool = param(
        False,
        help="vLLM: no CUDA graphs or torch.compile warm-up: the engine starts faster and decodes slower (the vLLM-on-CPU tests use it)",
    )
    # log-probabilities: how many top tokens to ask for (HTTP / vLLM)
    top_logprobs: int = param(
        20, help="how many top next tokens an HTTP server or vLLM returns with log-probabilities", range=(1, 100)
    )

    @property
    def urls(self) -> tuple[str, ...]:
        """``base_url`` as a tuple: one server, a pool, or none."""
        return (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url or ())

    def __post_init__(self):
        check_ranges(self)
        if self.kind == "openai" and not self.base_url:
            raise ConfigError("base_url: required when kind is 'openai' (e.g. http://127.0.0.1:8000/v1)")
        if self.dtype == "int8" and self.kind != "transformers":
            raise ConfigError(
                f"dtype: int8 (dynamic int8 quantization on CPU) is for kind transformers, not "
                f"{self.kind}; allowed here: auto, bfloat16, float32, float16"
            )
        # the URLs' and the key's safety rules belong to the HTTP engine (aloe.backends.http_safety),
        # which applies them in `aloe check` and whenever it opens


@dataclass(frozen=True)
class Price:
    """A model's list price, for cost before (aloe estimate) and after (manifests, results page) a run."""

    input: float = param(help="USD per million prompt (input) tokens", range=(0, 100000))
    output: float = param(help="USD per million generated (output) tokens", range=(0, 100000))
    cached_input: Optional[float] = param(
        None,
        help="USD per million prompt tokens the provider serves from its prompt cache; None: same as input",
        range=(0, 100000),
    )
    read: str = param(
        "", help="when and where the prices were read, e.g. '2026-11-30, platform.openai.com/docs/pricing'"
    )


@dataclass(frozen=True)
class Common:
    """Keys every stage receives."""

    experiment: str = param(help="experiment name: outputs go to data/<experiment>/ and reports/<experiment>/")
    data_root: str = param("data", help="folder holding every experiment's outputs")
    cache_path: str = param("data/cache/llm.sqlite", help="SQLite cache shared by every LLM call")
    backend: BackendConfig = param(factory=BackendConfig, help="the engine every role inherits (see parameters/*.yaml)")
    roles: dict[str, Any] = param(
        factory=dict,
        help="role -> backend settings merged over backend: generator, simulator, inferrer, responder, judge, policy",
    )
    prices: dict[str, Price] = param(
        factory=dict,
        help="model (as named in backend or roles) -> its price in USD per million tokens; roles on a priced model get a cost",
    )

    def __post_init__(self):
        check_ranges(self)
        resolved = {}
        for name in self.roles:
            if name not in ROLES:
                near = difflib.get_close_matches(str(name), ROLES, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"roles: unknown role {short(name)}{hint}; allowed roles: {', '.join(ROLES)}")
        for name in ROLES:
            resolved[name] = resolve_role(self.backend, self.roles.get(name), f"roles.{name}")
        object.__setattr__(self, "_resolved_roles", resolved)

    def role(self, name: str) -> "BackendConfig":
        """The backend settings of one role: ``roles.<name>`` merged over ``backend``."""
        if name not in ROLES:
            raise ConfigError(f"unknown role {name!r}; allowed roles: {', '.join(ROLES)}")
        return self._resolved_roles[name]  # type: ignore[attr-defined]

    @property
    def stage_dir_root(self) -> Path:
        return Path(self.data_root) / self.experiment

    @property
    def paths(self) -> Paths:
        return Paths(self.stage_dir_root)


# Engines whose log-probabilities are a reply's exact likelihood (HTTP servers return next-token top-k).
EXACT_LIKELIHOOD = ("transformers", "vllm", "scripted")


def exact_judge(judge: BackendConfig, key: str) -> None:
    if judge.kind not in EXACT_LIKELIHOOD:
        raise ConfigError(
            f"{key}: 'likelihood' needs a reply's exact log-likelihood, which a {judge.kind!r} "
            f"backend does not give (roles.judge.kind); use one of {', '.join(EXACT_LIKELIHOOD)}"
        )


def resolve_role(backend: BackendConfig, override: Any, where: str) -> BackendConfig:
    """``override`` (a role's mapping, or None) merged over ``backend``; validated like ``backend``."""
    if override is None:
        return backend
    if not isinstance(override, dict):
        raise ConfigError(f"{where}: expected a mapping of backend settings, got {short(override)}")
    base = {f.name: getattr(backend, f.name) for f in dataclasses.fields(BackendConfig)}
    if "model" in override and override["model"] != backend.model:
        for k in _MODEL_BOUND:  # another model's revision or served name would be wrong for this one
            base[k] = None
    return build(BackendConfig, {**base, **override}, where)


def check_preference_range(value: tuple[int, ...]) -> None:
    if value and (len(value) != 2 or not 1 <= value[0] <= value[1] <= 6):
        raise ConfigError(
            f"preferences: expected [low, high] with 1 <= low <= high <= 6 (e.g. [2, 4]), or [] for "
            f"none; got {list(value)!r}"
        )


@dataclass(frozen=True)
class PersonasConfig(Common):
    source: Literal["ours", "official"] = param(
        "ours", help='"ours" (seeds + growth) or "official" (the ALOE pool files in official_dir)'
    )
    official_dir: Optional[str] = param(
        None, help="folder holding profile.jsonl, personality.jsonl, profile_eval.jsonl, personality_eval.jsonl"
    )
    target_profiles: int = param(
        20, help="grow the profile pool to this size (no growth when the seeds reach it)", range=(1, 1000000)
    )
    target_personalities: int = param(20, help="grow the personality pool to this size", range=(1, 1000000))
    examples_per_round: int = param(5, help="pool members shown to the LLM as examples", range=(0, 100))
    items_per_round: int = param(20, help="new items asked for per request", range=(1, 1000))
    requests_per_round: int = param(4, help="requests per round (one batch)", range=(1, 100000))
    threshold: float = param(
        0.6, help="keep an item only if its cosine similarity to every pool member is at most this", range=(0.0, 1.0)
    )
    max_rounds: int = param(10, help="round limit per kind", range=(0, 100000))
    saturation_window: int = param(3, help="stop when the last this-many rounds ...", range=(1, 1000))
    saturation_floor: float = param(
        0.05, help="... accepted less than this share of their candidates", range=(0.0, 1.0)
    )
    temperature: float = param(0.9, help="sampling temperature for generation", range=(0.0, 5.0))
    max_new_tokens: int = param(512, help="cap on each generation reply", range=(1, 131072))
    pairs_per_profile: int = param(1, help="personalities paired with each training profile", range=(1, 1000))
    n_eval_personalities: int = param(
        5, help="benchmark personalities (every eval profile is paired with each)", range=(1, 100)
    )
    # checkable preferences per persona (aloe.preferences): [low, high] drawn by a seeded rule and
    # written to pairs.jsonl; [] for none (the free-text persona only)
    preferences: tuple[int, ...] = param(
        (), help="checkable preferences per persona, [low, high] by a seeded draw (aloe.preferences); [] for none"
    )
    seed: int = param(0, help="seeds example sampling, generation and pairing", range=(0, 4294967295))

    def __post_init__(self):
        super().__post_init__()
        check_preference_range(self.preferences)
        if self.source == "official" and not self.official_dir:
            raise ConfigError("official_dir: required when source is 'official' (the upstream datasets/ folder)")


@dataclass(frozen=True)
class TreesConfig(Common):
    n_personas: int = param(2, help="training personas to simulate (one tree each)", range=(1, 10000000))
    turns: int = param(1, help="turns per tree (the paper: 10)", range=(1, 100))
    max_new_tokens: int = param(48, help="cap on every generated message", range=(1, 131072))
    temperature: float = param(0.7, help="sampling temperature of the user simulator and responders", range=(0.0, 5.0))
    inference: Literal["extract", "blind"] = param(
        "extract", help='"extract": the inference step sees the persona (paper); "blind": dialogue only'
    )
    branch: Literal["random", "preferred", "rejected"] = param(
        "random", help='which reply continues: "random" (paper), "preferred", "rejected"'
    )
    # pair: the judge compares the two replies in both orders (the paper); likelihood: the reply the
    # persona makes more probable under the judge model wins (exact log-likelihoods: transformers or vllm);
    # rules: the reply that satisfies more of the persona's checkable preferences wins (exact, no model)
    pair_judge: Literal["pair", "likelihood", "rules"] = param(
        "pair",
        help='"pair": compare the two replies in both orders (paper); "likelihood": the reply the persona makes more probable wins; "rules": the reply keeping more checkable preferences wins',
    )
    judge_method: Literal["auto", "logprobs", "text"] = param(
        "auto", help='"auto": probabilities of 1/2, parsed text where there are none; "logprobs"; "text"'
    )
    judge_retries: int = param(2, help="extra tries when a text verdict does not parse", range=(0, 20))
    # pairs whose two orders disagree: average the two orders' probabilities; decide by each reply's
    # own 1-5 rubric score (no position to prefer); keep as an unlabelled tie; or drop the pair
    inconsistent: Literal["average", "pointwise", "tie", "drop"] = param(
        "pointwise", help='orders disagree: "pointwise" (rubric score of each reply), "average", "tie", "drop"'
    )
    disclosure_threshold: float = param(
        0.5, help="MiniLM cosine at which a persona fact counts as revealed / recovered", range=(0.0, 1.0)
    )
    # checkable preferences: when the simulated user's message does not convey the preference it was
    # told to reveal, append the catalogue's phrasing (recorded); false: it stays unrevealed
    disclosure_fallback: bool = param(
        True,
        help="append the catalogue phrasing when the simulated user did not convey the preference it was told to reveal",
    )
    # the stage fails (no manifest; a rerun retries) when more trees than this share failed
    max_failed_share: float = param(
        0.1,
        help="the stage fails (no manifest; a rerun retries them) when more trees than this share failed",
        range=(0.0, 1.0),
    )
    # auto: each tree advances on its own as its answers arrive where every engine of the stage is an
    # HTTP server (no barrier on one slow call); lockstep batches on local engines, which want batches
    schedule: Literal["auto", "lockstep", "conversation"] = param(
        "auto",
        help='"auto": "conversation" where every engine of the stage is an HTTP server, else "lockstep"; "lockstep": one batch per role per turn; "conversation": each tree advances as its own answers arrive',
    )
    seed: int = param(0, help="seeds sampling and the branch choice", range=(0, 4294967295))

    def __post_init__(self):
        super().__post_init__()
        if self.pair_judge == "likelihood":
            exact_judge(self.role("judge"), "pair_judge")
        if self.schedule == "conversation":
            local = [
                r
                for r in ("simulator", "inferrer", "responder", "judge")
                if self.role(r).kind in ("transformers", "vllm") and not (r == "judge" and self.pair_judge == "rules")
            ]
            if local:
                raise ConfigError(
                    f"schedule: 'conversation' sends each tree's requests on their own, for HTTP "
                    f"servers; roles {', '.join(local)} run on a local engine, which wants batches: "
                    f"use schedule: auto or lockstep"
                )


@dataclass(frozen=True)
class TrainConfig(Common):
    # what to train (aloe.variants); the model trained is the policy role
    variants: tuple[Literal[tuple(VARIANTS)], ...] = param(
        ("sft_preferred",), help="any of sft_preferred, sft_rejected, dpo, sft_then_dpo"
    )  # type: ignore[valid-type]
    lora: bool = param(True, help="LoRA adapters (PEFT); False: full fine-tuning")
    peft: dict[str, Any] = param(
        factory=dict, help="peft.LoraConfig fields, passed through (defaults: r 16, lora_alpha 32, all-linear)"
    )
    sft: dict[str, Any] = param(
        factory=dict, help="trl.SFTConfig fields, passed through (e.g. learning_rate, max_steps, max_length)"
    )
    dpo: dict[str, Any] = param(factory=dict, help="trl.DPOConfig fields, passed through (e.g. beta, learning_rate)")
    merge: bool = param(True, help="also save a merged model folder that evaluation loads")
    seed: int = param(0, help="training seed", range=(0, 4294967295))

    def __post_init__(self):
        super().__post_init__()
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(
                f"variants: expected one or more distinct variants ({', '.join(VARIANTS)}), got "
                f"{short(list(self.variants))}; to skip training, run the other stages with --only"
            )

    @property
    def base_model(self) -> str:
        return self.role("policy").model


@dataclass(frozen=True)
class JudgeCardConfig:
    """Judge validation on every evaluation run (aloe.judge_card) and the thresholds that decide
    whether the judge is fit to rank models. ``fit`` is decided on known answers (K1, K2), never on
    the models' own replies, and never without an independent judge."""

    enabled: bool = param(True, help="write the judge card (judge_card.json) on every evaluation run")
    max_replies: int = param(
        300, help="replies re-scored against a mismatched persona (spread over models and personas)", range=(1, 1000000)
    )
    k1_messages: int = param(
        2, help="K1: user messages per benchmark persona that the responder answers tailored and plain", range=(1, 100)
    )
    max_k2_pairs: int = param(
        200, help="K2: preference pairs (a satisfying reply and its violating edit), at most", range=(1, 1000000)
    )
    # K1: the tailored reply must score higher under its own persona than under a mismatched one this often
    # (and its CI low > 0.5)
    min_discrimination: float = param(
        0.65,
        help="K1: the tailored reply must score higher under its own persona than under a mismatched one this often (and its CI low > 0.5)",
        range=(0.0, 1.0),
    )
    min_tailored: float = param(
        0.55,
        help="K1: tailored replies must beat plain ones this often under the own persona (CI low > 0.5)",
        range=(0.0, 1.0),
    )
    min_preference: float = param(
        0.65, help="K2: the satisfying reply must beat its violating edit this often (CI low > 0.5)", range=(0.0, 1.0)
    )
    max_length_corr: float = param(
        0.5, help="|Spearman correlation| of score with reply length at most this", range=(0.0, 1.0)
    )
    # the own-minus-mismatched score gap (1-5 points) must have its CI low above this: a win rate can
    # clear min_discrimination on gaps of a hundredth of a point that lean one way by accident
    min_gap: float = param(
        0.0,
        help="K1: the own-minus-mismatched score gap (1-5 points) must have its CI low above this",
        range=(0.0, 4.0),
    )
    compare: tuple[Literal["paper", "history", "likelihood", "rules"], ...] = param(
        (), help="other judges to measure agreement with"
    )
    n_boot: int = param(1000, help="bootstrap resamples for the card's intervals", range=(10, 1000000))

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class EvaluateConfig(Common):
    n_personas: int = param(
        2, help="benchmark personas (the first n of 20 profiles x 5 personalities, spread over both)", range=(1, 100)
    )
    turns: int = param(1, help="turns per conversation (the paper: 10)", range=(1, 100))
    max_new_tokens: int = param(48, help="cap on every generated message", range=(1, 131072))
    # models under test: base (plain prompt), oracle (persona in the system prompt: an upper
    # reference), reminder (told to infer and adapt), and trained variants from the train stage
    models: tuple[Literal[EVALUATED], ...] = param(
        ("base",), help="base, oracle, reminder, and trained variants (sft_preferred, sft_rejected, dpo, sft_then_dpo)"
    )  # type: ignore[valid-type]
    # paper: the rubric on the current message (the paper's judge); history: the rubric with the dialogue;
    # likelihood: how much more probable the persona makes the reply under the judge model (exact
    # log-likelihoods: transformers or vllm judges), mapped to 1-5 by likelihood_scale; rules: the share of
    # the persona's checkable preferences the reply satisfies, 1 + 4 x share (exact, no model)
    score_judge: Literal["paper", "history", "likelihood", "rules"] = param(
        "paper",
        help='"paper": the rubric on the current message; "history": also the conversation; "likelihood": the persona\'s likelihood ratio; "rules": the share of checkable preferences kept',
    )
    # aloe: every model under test gets a short system prompt and greedy decoding with max_new_tokens;
    # paper: as the paper's evaluation code, no system prompt (oracle and reminder keep theirs), the
    # model's own default sampling and a 2048-token cap
    protocol: Literal["aloe", "paper"] = param(
        "aloe",
        help='"aloe": short system prompt, greedy, max_new_tokens; "paper": no system prompt, the model\'s own sampling, 2048-token cap',
    )
    judge_method: Literal["auto", "logprobs", "text"] = param(
        "auto", help='"auto": probabilities of 1..5, parsed text where there are none; "logprobs"; "text"'
    )
    judge_retries: int = param(2, help="extra tries when a text score does not parse", range=(0, 20))
    user_temperature: float = param(
        0.7, help="the simulated user samples; the model under test decodes greedily", range=(0.0, 5.0)
    )
    official_dir: Optional[str] = param(
        None, help="folder with the official profile_eval.jsonl / personality_eval.jsonl (None: ours)"
    )
    # with official_dir: checkable preferences per benchmark persona, [low, high] by the seeded draw
    # (the published text is unchanged); without it, the personas stage's pairs.jsonl carries them
    preferences: tuple[int, ...] = param(
        (),
        help="with official_dir: checkable preferences per benchmark persona, [low, high]; else pairs.jsonl carries them",
    )
    disclosure_fallback: bool = param(
        True,
        help="append the catalogue phrasing when the simulated user did not convey the preference it was told to reveal",
    )
    likelihood_scale: float = param(
        0.1, help="likelihood judge: nats per token that move a score from 3 to 3.92 (README)", range=(0.001, 100.0)
    )
    judge_card: JudgeCardConfig = param(
        factory=JudgeCardConfig,
        help="judge validation: known answers K1/K2 and thresholds min_discrimination, min_tailored, min_preference, min_gap, max_length_corr, compare, ...",
    )
    disclosure_threshold: float = param(
        0.5, help="MiniLM cosine at which a persona fact counts as revealed", range=(0.0, 1.0)
    )
    # the stage fails (no manifest; a rerun retries) when more conversations than this share are incomplete
    max_failed_share: float = param(
        0.1,
        help="the stage fails (no manifest; a rerun retries them) when more conversations than this share are incomplete",
        range=(0.0, 1.0),
    )
    # conversations per persona, the simulated user seeded seed, seed+1, ...; scores are averaged per
    # persona and turn over repeats before the bootstrap (the persona stays the resampled unit)
    repeats: int = param(
        1,
        help="conversations per persona (simulator seeds seed, seed+1, ...), averaged per persona and turn",
        range=(1, 100),
    )
    n_boot: int = param(2000, help="bootstrap resamples for the confidence intervals", range=(10, 1000000))
    schedule: Literal["auto", "lockstep"] = param(
        "auto",
        help='"auto": each conversation advances as its own answers arrive where the simulator, the judge and the model under test are HTTP servers, else "lockstep": one batch per role per turn',
    )
    seed: int = param(0, help="seeds the simulated user and the bootstrap", range=(0, 4294967295))

    def __post_init__(self):
        super().__post_init__()
        check_preference_range(self.preferences)
        if self.preferences and not self.official_dir:
            raise ConfigError(
                "preferences: set it on the personas stage (its pairs.jsonl carries them); here it "
                "applies only with official_dir"
            )
        if "likelihood" in (self.score_judge, *self.judge_card.compare):
            exact_judge(self.role("judge"), "score_judge" if self.score_judge == "likelihood" else "judge_card.compare")
        if len(set(self.models)) != len(self.models) or not self.models:
            raise ConfigError(f"models: expected distinct model names, got {list(self.models)!r}")


@dataclass(frozen=True)
class ReportConfig(Common):
    title: str = param("aloe run", help="heading of the report")


STAGE_CONFIGS: dict[str, type] = {
    "personas": PersonasConfig,
    "trees": TreesConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    description: str
    common: dict  # raw common keys injected into every stage
    stages: dict[str, Any]  # stage name -> typed stage config
    raw_sections: dict[str, dict]  # stage name -> the YAML section as written

    def parameters_for(self, stage: str) -> dict:
        """The flat Papermill parameters for one stage's notebook: every field of its config,
        the file's value or else the config class default. All of them, because the notebooks'
        own defaults are the default study's (for a person in JupyterLab), and a key this file
        leaves unset must not silently take the default study's value."""
        given = {"experiment": self.name, **self.common, **self.raw_sections.get(stage, {})}
        params = {}
        for f in dataclasses.fields(STAGE_CONFIGS[stage]):
            if not f.init:
                continue
            if f.name in given:
                params[f.name] = given[f.name]
            elif f.default is not dataclasses.MISSING:
                params[f.name] = _literal(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                params[f.name] = _literal(f.default_factory())  # type: ignore[misc]
        return params


def _literal(value: Any) -> Any:
    """A config default as a plain literal Papermill can inject (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _literal(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


_TOP_KEYS = ("experiment", "description", "data_root", "cache_path", "backend", "roles", "prices", "stages")


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate a parameter file; every error names the file and key."""
    path = Path(path)
    data = load_yaml(path)
    name = _check_top_level(path, data)
    common = {k: data[k] for k in ("data_root", "cache_path", "backend", "roles", "prices") if k in data}
    stages_raw = data.get("stages", {})
    for k in stages_raw:
        if k not in STAGES:
            raise ConfigError(f"{path}: stages: unknown stage {short(k)}; allowed stages: {', '.join(STAGES)}")
    try:
        common_built = build(Common, {"experiment": name, **common}, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).lstrip(': ')}") from None
    stages, raw_sections = {}, {}
    for stage in STAGES:
        section = stages_raw.get(stage, {})
        _check_section(path, stage, section)
        raw_sections[stage] = dict(section)
        fields = {f.name: getattr(common_built, f.name) for f in dataclasses.fields(Common)}
        try:
            stages[stage] = build(STAGE_CONFIGS[stage], {**fields, **section}, f"stages.{stage}")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    from aloe.variants import needed

    trained = set(needed(stages["train"].variants))
    for m in stages["evaluate"].models:
        if m in VARIANTS and m not in trained:
            raise ConfigError(
                f"{path}: stages.evaluate.models: {m!r} is never trained; add it to "
                f"stages.train.variants (now {list(stages['train'].variants)}) or remove it"
            )
    return Experiment(
        path=path,
        name=name,
        description=str(data.get("description", "")),
        common=common,
        stages=stages,
        raw_sections=raw_sections,
    )


def _check_top_level(path: Path, data: Any) -> str:
    """The file's top-level keys and their kinds; returns the experiment's name."""
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a parameter file needs at least `experiment:` and `backend:`")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for k in data:
        if k not in _TOP_KEYS:
            near = difflib.get_close_matches(str(k), _TOP_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: unknown top-level key {short(k)}{hint}; allowed keys: {', '.join(_TOP_KEYS)}")
    name = data.get("experiment", path.stem)
    if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{path}: experiment: {short(name)} is not a folder-safe name: 1-64 characters "
            f"of letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    for k in ("description", "data_root", "cache_path"):
        if k in data and not isinstance(data[k], str):
            raise ConfigError(f"{path}: {k}: expected a string, got {short(data[k])}")
    for k in ("backend", "roles", "prices", "stages"):
        if k in data and not isinstance(data[k], dict):
            raise ConfigError(
                f"{path}: {k}: expected a mapping, got {short(data[k])}; leave the key out to use the defaults"
            )
    return name


def _check_section(path: Path, stage: str, section: Any) -> None:
    """A stage's section: a mapping of its own keys (not retired ones, not top-level ones)."""
    where = f"stages.{stage}"
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: {where}: expected a mapping of settings, got {short(section)}; leave "
            f"the stage out to use its defaults"
        )
    own_keys = {f.name for f in dataclasses.fields(Common)}
    allowed = [f.name for f in dataclasses.fields(STAGE_CONFIGS[stage]) if f.name not in own_keys]
    for k in section:
        if (stage, k) in RETIRED:
            raise ConfigError(f"{path}: {where}.{k}: no longer a stage key; {RETIRED[stage, k]}")
        if k in own_keys:
            raise ConfigError(f"{path}: {where}.{k}: {k!r} is set at the top level, not per stage")
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: {where}: unknown key {short(k)}{hint}; allowed keys: {', '.join(allowed)}")


def stage_config(stage: str, **params: Any) -> Any:
    """Build one stage's typed config from notebook parameters (same checks as the runner)."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; allowed stages: {', '.join(STAGES)}")
    for k in params:
        if (stage, k) in RETIRED:
            raise ConfigError(f"{stage}.{k}: no longer a stage key; {RETIRED[stage, k]}")
    return build(STAGE_CONFIGS[stage], params, stage)


def stage_fields(stage: str) -> list[str]:
    """The parameters a stage's notebook declares: its config's fields, in order."""
    return [f.name for f in dataclasses.fields(STAGE_CONFIGS[stage]) if f.init]


def from_namespace(stage: str, namespace: dict) -> Any:
    """A notebook's typed config in one call: its parameters, read by name from ``namespace``
    (the notebook's globals, after Papermill injected the run's values)."""
    return stage_config(stage, **{k: namespace[k] for k in stage_fields(stage) if k in namespace})
