"""``aloe estimate parameters/X.yaml``: calls, tokens, cost and time per stage and role, before a run.

It runs the stages' own code (personas, trees, evaluate, the judge card included) in a throwaway
folder on a *sizing* engine per role: no model, no key, no network. Each engine answers every
request with a reply of the configured cap (``max_new_tokens``; ``fill`` scales it), judges with a
valid verdict, and counts the prompt's tokens with the model's own tokenizer where it is on this
machine, else as characters / 4. Trees and evaluation run on a sample of personas and are scaled to
the file's ``n_personas`` (both are linear in it). Training makes no model calls.

What it is not: a replay of real replies. Real replies stop before the cap, so output tokens are an
upper bound at ``fill`` 1.0; prompts carry those replies as history, so input tokens lean high too.
``replies`` (``--replies-from``, a finished run's folder, e.g. a pilot of a few personas) sizes each
reply instead at the mean length that run's manifests record for the same model and prompt version;
the cap (times ``fill``) stays for what the pilot never asked.
Wall time is the ideal: calls x latency / concurrency, or the rate limits' floor when they bind.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import logging
import math
import tempfile
from pathlib import Path

from aloe.backends.base import CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest
from aloe.cache import CallCache
from aloe.config import BackendConfig, Experiment
from aloe.cost import LOCAL_KINDS, fmt_duration, fmt_usd, prefix_discount, row_cost

log = logging.getLogger(__name__)

FILLER = "lot"  # three characters and a space: one token in the tokenizers used here, and 4 characters


def _tokenizer(cfg: BackendConfig):
    """The model's tokenizer where it is already on this machine (never downloaded, never converted)."""
    if cfg.kind not in ("transformers", "vllm"):
        return None
    try:
        from transformers import AutoTokenizer

        from aloe.models import converted_folder, resolve_model

        spec = resolve_model(cfg.model, cfg.revision)
        where = {"local": spec.path, "hf": spec.hf_id}.get(spec.source) or converted_folder(spec)
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception:  # not here, or not a model we can name: fall back to characters / 4
        return None


class SizingBackend(ChatBackend):
    """Stands in for one role's engine: answers of the configured length, tokens counted."""

    def __init__(
        self,
        cfg: BackendConfig,
        fill: float = 1.0,
        cache: CallCache | None = None,
        replies: dict[tuple[str, str], float] | None = None,
    ):
        super().__init__(cfg.model, "estimate", cache)
        self.config = cfg
        self.kind = cfg.kind  # costed as the engine it stands for
        self.fill = fill
        self.lengths = replies or {}  # (model, prompt version) -> mean reply tokens in a finished run
        self.like = cfg.model  # whose lengths stand in where this model's are unknown (a trained variant)
        self.sized = [0, 0]  # replies sized by a finished run's lengths, and by the cap
        self.tok = _tokenizer(cfg)
        self.counted_by = "tokenizer" if self.tok is not None else "characters / 4"
        self.seen: list[str] = []  # every prompt so far, sorted: the longest shared prefix is a neighbour's
        self.prefix_tokens = 0.0  # input tokens in a prefix some earlier prompt of this engine began with

    def _repeated(self, messages, tokens: int) -> None:
        """Count the share of this prompt that an earlier prompt already began with (what a
        provider's prompt cache could serve), in proportion to its characters."""
        text = "".join(f"\x1e{m.get('role')}\x1f{m.get('content') or ''}" for m in messages)
        i = bisect.bisect_left(self.seen, text)
        best = max((_shared(text, self.seen[j]) for j in (i - 1, i) if 0 <= j < len(self.seen)), default=0)
        self.prefix_tokens += tokens * best / max(1, len(text))
        self.seen.insert(i, text)

    def _count(self, messages) -> int:
        if self.tok is not None:
            from aloe.backends.transformers_backend import prompt_ids

            try:
                return len(prompt_ids(self.tok, messages))
            except Exception:  # a template that refuses these messages: count characters instead
                pass
        return sum(math.ceil(len(m.get("content") or "") / 4) + 4 for m in messages) + 3

    def _reply(self, r: ChatRequest) -> tuple[str, int]:
        name = r.prompt_version.split("@")[0]
        if name == "judge_pair":  # "1" in both orders: inconsistent, so the fallbacks run too (an upper bound)
            return "1", 1
        if name.startswith("judge_score"):
            return "3", 1
        n = self._length(r)
        if name.startswith("generate_"):  # growth: one numbered item per line, each distinct
            words = [f"item {i} {' '.join(FILLER + str(i * 7 + j) for j in range(8))}" for i in range(1, 1 + n // 12)]
            return "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1)) or FILLER, n
        # a reply of its own per model and request, as real replies are: identical conversations would
        # be asked once (identical requests of a batch are), and the estimate would count too few calls
        # (a trained variant answering exactly as base made the simulator's next turns cache hits)
        # (3 hex digits, about one token: two replies of a turn then come out equal now and then, e.g.
        # 375 of paper.yaml's 180,000 trees calls go uncounted; 8 digits count them all but add some 5 %
        # of tokens to every history on default.yaml, a larger error)
        key = repr((self.model_id, r.messages, r.sample_index, r.sampling.seed))
        tag = hashlib.sha256(key.encode()).hexdigest()[:3]
        return " ".join([FILLER + tag] + [FILLER] * (n - 1)), n

    def _length(self, r: ChatRequest) -> int:
        cap = r.sampling.max_tokens or 256
        seen = self.lengths.get((self.model_id, r.prompt_version), self.lengths.get((self.like, r.prompt_version)))
        self.sized[seen is None] += 1
        return max(1, min(cap, round(seen if seen is not None else cap * self.fill)))

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        # a scheduled stage (HTTP roles: each tree on its own) calls from several threads; the sorted
        # prompts and the counters are this engine's own state
        with self._book_lock:
            out = []
            for r in requests:
                text, n = self._reply(r)
                p = self._count(r.messages)
                self._repeated(r.messages, p)
                self.prompt_tokens += p
                self.generated_tokens += n
                out.append(Completion(text, finish_reason="length", completion_tokens=n, prompt_tokens=p))
            return out

    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        # from several threads too: see _generate
        with self._book_lock:
            out = []
            for r in requests:
                p = self._count(r.messages)
                self._repeated(r.messages, p)
                read = p + max(len(c.split()) for c in r.candidates)
                wrote = 0 if self.kind in LOCAL_KINDS else 1  # a server answers one token
                self.prompt_tokens += read
                self.generated_tokens += wrote
                # the first candidate a little ahead, whatever the order: a pair judge asked in both orders
                # then contradicts itself, and the judging takes its longest route (the fallbacks run)
                k = len(r.candidates)
                first = 0.4 + 0.6 / k
                out.append(
                    CandidateLogprobs(
                        {
                            c: math.log(first if i == 0 else (1 - first) / (k - 1) if k > 1 else 1.0)
                            for i, c in enumerate(r.candidates)
                        },
                        tokens={c: max(1, len(c.split())) for c in r.candidates},
                        prompt_tokens=read,
                        completion_tokens=wrote,
                    )
                )
            return out


def _shared(a: str, b: str) -> int:
    """Length of the common prefix of two strings."""
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on equal prefixes: long prompts compare in C, not char by char
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclasses.dataclass
class Line:
    stage: str
    role: str
    model: str
    kind: str
    calls: float
    prompt_tokens: float
    completion_tokens: float
    cost_usd: float | None
    seconds: float | None
    counted_by: str
    prefix_tokens: float = 0.0  # input tokens in a prefix an earlier prompt of the engine began with
    cached_cost_usd: float | None = None  # cost if the provider's cache served every repeated prefix
    sized_by_run: float = 0.0  # replies sized by a finished run's lengths (--replies-from)
    sized_at_cap: float = 0.0  # replies sized at fill x their cap


def _scale(rows: list[dict], factor: float) -> list[dict]:
    keys = (
        "calls",
        "prompt_tokens",
        "completion_tokens",
        "prefix_tokens",
        "sized_by_run",
        "sized_at_cap",
        "cached_calls",
        "cached_tokens",
    )
    return [{**r, **{k: r[k] * factor for k in keys}} for r in rows]


FEW_REPLIES = 30  # below this many replies to one prompt, `reply_lengths` says its mean is noisy


def pilot_personas(exp: Experiment) -> int:
    """The fewest personas whose trees give each prompt FEW_REPLIES replies (one a turn per persona):
    the pilot to size replies by (on default.yaml, 10 personas estimated every stage within 25 %
    where 2 did not; docs/benchmarks.md)."""
    return math.ceil(FEW_REPLIES / exp.stages["trees"].turns)


def reply_lengths(folder: str | Path) -> dict[tuple[str, str], float]:
    """(model, prompt version) -> mean reply tokens, from a finished run's stage manifests (the
    folder that holds personas/, trees/ and evaluate/, e.g. data/pilot)."""
    from aloe.errors import ConfigError
    from aloe.io import read_json

    root = Path(folder)
    tally: dict[tuple[str, str], list[int]] = {}
    for stage in ("personas", "trees", "evaluate"):
        manifest = root / stage / "manifest.json"
        if not manifest.exists():
            continue
        for u in read_json(manifest).get("usage") or []:
            for version, n in (u.get("replies") or {}).items():
                t = tally.setdefault((u["model"], version), [0, 0])
                t[0] += n["calls"]
                t[1] += n["completion_tokens"]
    if not tally:
        raise ConfigError(
            f"--replies-from {root}: no stage manifest there records its replies' lengths "
            f"(personas/, trees/ or evaluate/manifest.json with usage[].replies); give the data folder of "
            f"a run finished by this version of aloe, e.g. a pilot: the same file with a few personas"
        )
    few = sorted(f"{v} of {m} ({n})" for (m, v), (n, _) in tally.items() if 0 < n < FEW_REPLIES)
    if few:  # a mean of a few replies moves with the personas they answered (docs/benchmarks.md)
        log.warning(
            "--replies-from %s: lengths from fewer than %d replies: %s; the estimate is as noisy as they are "
            "(a pilot asks each trees prompt once a turn per persona: %d replies take %d / turns personas)",
            root,
            FEW_REPLIES,
            ", ".join(few),
            FEW_REPLIES,
            FEW_REPLIES,
        )
    return {k: t / n for k, (n, t) in tally.items() if n}


def _totals(rows: list[dict], cached_tokens) -> dict[str, float]:
    t = {k: sum(r[k] for r in rows) for k in ("calls", "prompt_tokens", "completion_tokens")}
    t["tokens"] = t["prompt_tokens"] + t["completion_tokens"]
    t["asked_calls"] = t["calls"] + sum(r["cached_calls"] for r in rows)
    t["asked_tokens"] = t["tokens"] + sum(cached_tokens(r) for r in rows)
    return t


def against_run(rows: list[dict], folder: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """Stage -> {"run": ..., "estimate": ...} for each stage the finished run in ``folder`` made:
    calls and tokens sent, and asked (sent plus those the call cache answered, each at what it cost
    when made), from its manifests' usage and from ``rows`` (measure) of the same file."""
    from aloe.io import read_json

    out = {}
    for stage in ("personas", "trees", "evaluate"):
        manifest = Path(folder) / stage / "manifest.json"
        if not manifest.exists():  # a stage the run has not made (yet)
            continue
        used = read_json(manifest).get("usage") or []
        out[stage] = {
            "run": _totals(used, lambda u: u["cached_prompt_tokens"] + u["cached_completion_tokens"]),
            "estimate": _totals([r for r in rows if r["stage"] == stage], lambda r: r["cached_tokens"]),
        }
    return out


def _engines(
    exp: Experiment,
    stage: str,
    roles: tuple[str, ...],
    fill: float,
    cache: CallCache,
    replies: dict[tuple[str, str], float] | None = None,
) -> dict[str, SizingBackend]:
    """role -> sizing engine; roles whose settings come out equal share one, as in a real run, and
    all share one call cache, so what a real run would answer from its cache is not counted."""
    cfg = exp.stages[stage]
    by_cfg: dict[BackendConfig, SizingBackend] = {}
    for r in roles:
        if cfg.role(r) not in by_cfg:
            by_cfg[cfg.role(r)] = SizingBackend(cfg.role(r), fill, cache, replies)
    return {r: by_cfg[cfg.role(r)] for r in roles}


def _rows(given: dict[str, SizingBackend], stage: str, asked: frozenset[str] | None = None) -> list[dict]:
    """Usage rows per engine, naming the roles that asked for it (all given ones without ``asked``)."""
    out = []
    for e in dict.fromkeys(given.values()):
        if e.sent:
            out.append(
                {
                    "stage": stage,
                    "role": ", ".join(r for r, g in given.items() if g is e and (asked is None or r in asked)),
                    "model": e.model_id,
                    "kind": e.kind,
                    "calls": e.sent,
                    "prompt_tokens": e.prompt_tokens,
                    "completion_tokens": e.generated_tokens,
                    "counted_by": e.counted_by,
                    "config": e.config,
                    "prefix_tokens": e.prefix_tokens,
                    "sized_by_run": e.sized[0],
                    "sized_at_cap": e.sized[1],
                    # asked again and answered by the call cache (an earlier identical request): not sent
                    "cached_calls": e.from_cache,
                    "cached_tokens": e.cached_prompt_tokens + e.cached_completion_tokens,
                }
            )
    return out


@contextlib.contextmanager
def _stand_in_quiet():
    """The stand-in stages' info lines (progress, "cost so far", schedule) describe a sample on
    scripted engines, not the run: keep them off the console; warnings and errors still show."""
    quiet = [logging.getLogger(n) for n in ("aloe", "sentence_transformers")]
    before = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(max(logging.WARNING, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, level in zip(quiet, before):
            lg.setLevel(level)


def _sample(n: int, sample: int) -> tuple[int, float]:
    k = max(1, min(n, sample))
    return k, n / k


def measure(
    exp: Experiment,
    sample: int = 8,
    fill: float = 1.0,
    stages=("personas", "trees", "evaluate"),
    replies: dict[tuple[str, str], float] | None = None,
) -> list[dict]:
    """Usage rows (stage, role, model, kind, calls, prompt/completion tokens) for the whole run;
    ``replies`` (reply_lengths) sizes replies by a finished run's, else at ``fill`` of their cap."""
    from aloe import personas, trees
    from aloe.roles import Roles

    rows: list[dict] = []
    with _stand_in_quiet(), tempfile.TemporaryDirectory(prefix="aloe-estimate-") as tmp:

        def local(stage, **extra):
            c = exp.stages[stage]
            return dataclasses.replace(c, data_root=tmp, cache_path=str(Path(tmp) / "calls.sqlite"), **extra)

        pcfg = local("personas")
        if pcfg.source == "official" and not Path(pcfg.official_dir or "").is_dir():
            # the texts only set prompt lengths: the project's seeds stand in for missing official files
            log.warning(
                "estimate: %s not found; the project's seed personas stand in for the official ones", pcfg.official_dir
            )
            pcfg = dataclasses.replace(pcfg, source="seeds", official_dir=None, preferences=pcfg.preferences)
        cache = CallCache(Path(tmp) / "sizing.sqlite")
        proles = _engines(exp, "personas", personas.roles_used(exp.stages["personas"]), fill, cache, replies)
        asked = Roles({}, None, proles)
        personas.run(pcfg, asked if proles else None)
        rows += _rows(proles, "personas", asked.asked)
        if "trees" in stages:
            t = exp.stages["trees"]
            k, factor = _sample(t.n_personas, sample)
            troles = _engines(exp, "trees", trees.roles_used(t), fill, cache, replies)
            asked = Roles({}, None, troles)
            trees.run(local("trees", n_personas=k), asked, progress=False)
            rows += _scale(_rows(troles, "trees", asked.asked), factor)
        if "evaluate" in stages:
            rows += _measure_evaluate(exp, local("evaluate"), sample, fill, cache, replies)
    return rows


def _measure_evaluate(exp: Experiment, ecfg, sample: int, fill: float, cache: CallCache, replies) -> list[dict]:
    """The evaluation stage's rows: a sample of its personas on sizing engines, scaled to the file's
    count; each trained model under test gets its own engine (its row says which)."""
    from aloe import evaluation
    from aloe.config import STAGE_ROLES
    from aloe.errors import AloeError
    from aloe.roles import Roles

    e = exp.stages["evaluate"]
    k, factor = _sample(e.n_personas, sample)
    ecfg = dataclasses.replace(ecfg, n_personas=k)
    if e.official_dir and not Path(e.official_dir).is_dir():
        ecfg = dataclasses.replace(ecfg, official_dir=None)
    eroles = _engines(exp, "evaluate", STAGE_ROLES["evaluate"], fill, cache, replies)
    policy = e.role("policy")
    trained_engines = []

    def trained(model: str) -> ChatBackend:
        eng = SizingBackend(
            dataclasses.replace(policy, kind="vllm" if policy.kind == "vllm" else "transformers"),
            fill,
            cache,
            replies,
        )
        eng.model_id = model  # its own lengths where the finished run trained it, else the policy's
        trained_engines.append(eng)
        return eng

    try:
        asked = Roles({}, None, eroles)
        evaluation.run(ecfg, asked, progress=False, trained=trained)
    except AloeError as err:
        if "benchmark personas" not in str(err):
            raise
        raise AloeError(f"estimate: {err}") from None
    under_test = {f"under test: {eng.model_id}": eng for eng in trained_engines}
    return _scale(_rows(eroles, "evaluate", asked.asked) + _rows(under_test, "evaluate"), factor)


def _concurrency(cfg: BackendConfig) -> int:
    """Calls in flight at once: max_concurrency per server of the pool (one on a local engine)."""
    return cfg.max_concurrency * max(1, len(cfg.urls)) if cfg.kind == "openai" else 1


def estimate(
    exp: Experiment,
    sample: int = 8,
    fill: float = 1.0,
    latency_s: float = 5.0,
    replies: dict[tuple[str, str], float] | None = None,
) -> list[Line]:
    """One line per stage and engine: calls, tokens, cost at the file's prices, ideal wall time."""
    lines = []
    for r in measure(exp, sample, fill, replies=replies):
        bc = r["config"]
        prices = exp.stages[r["stage"]].prices
        cost, _ = row_cost(r, prices)
        cached = (
            None
            if cost is None
            else cost
            - (0.0 if r["kind"] in LOCAL_KINDS else prefix_discount(r["prefix_tokens"], prices.get(r["model"])))
        )
        seconds = None
        if r["kind"] not in LOCAL_KINDS:
            seconds = r["calls"] * latency_s / _concurrency(bc)
            if bc.rpm:
                seconds = max(seconds, r["calls"] / bc.rpm * 60)
            if bc.tpm:
                seconds = max(seconds, (r["prompt_tokens"] + r["completion_tokens"]) / bc.tpm * 60)
        lines.append(
            Line(
                r["stage"],
                r["role"],
                r["model"],
                r["kind"],
                r["calls"],
                r["prompt_tokens"],
                r["completion_tokens"],
                cost,
                seconds,
                r["counted_by"],
                r["prefix_tokens"],
                cached,
                r["sized_by_run"],
                r["sized_at_cap"],
            )
        )
    return lines


def priced(exp: Experiment) -> bool:
    """True when some role of the run is a served model with a price: `aloe run` estimates first."""
    from aloe.config import ROLES

    for cfg in exp.stages.values():
        for r in ROLES:
            bc = cfg.role(r)
            if bc.kind not in LOCAL_KINDS and bc.model in cfg.prices:
                return True
    return False


def _n(x) -> str:
    return f"{round(x):,}"


def _t(s) -> str:
    return "local" if s is None else fmt_duration(s)


def _share(part, whole) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _sum_or_none(values: list):
    return None if any(v is None for v in values) else sum(values)


def _total_row(lines: list[Line]) -> list[str]:
    prompt = sum(ln.prompt_tokens for ln in lines)
    return [
        "total",
        "",
        "",
        "",
        _n(sum(ln.calls for ln in lines)),
        _n(prompt),
        _share(sum(ln.prefix_tokens for ln in lines), prompt),
        _n(sum(ln.completion_tokens for ln in lines)),
        fmt_usd(_sum_or_none([ln.cost_usd for ln in lines])),
        fmt_usd(_sum_or_none([ln.cached_cost_usd for ln in lines])),
        _t(sum(ln.seconds or 0 for ln in lines)) if any(ln.seconds for ln in lines) else "local",
    ]


def _sizing(lines: list[Line], fill: float, replies_from: str | None, pilot: int | None = None) -> str:
    by_run, at_cap = sum(ln.sized_by_run for ln in lines), sum(ln.sized_at_cap for ln in lines)
    cap = f"at {fill:.0%} of their cap (an upper bound on output tokens)"
    if not replies_from:
        closer = (
            f" (closer: run a pilot, this file with {pilot} personas in trees and evaluation, {FEW_REPLIES} "
            f"replies a prompt, and give its data folder to --replies-from)"
            if pilot
            else ""
        )
        return f"Replies {cap}{closer}"
    return (
        f"Replies at the mean length {replies_from}'s run recorded for the same model and prompt "
        f"({_share(by_run, by_run + at_cap)} of them), the rest {cap}"
    )


def table(
    lines: list[Line], latency_s: float, fill: float, replies_from: str | None = None, pilot: int | None = None
) -> str:
    """The estimate as a text table; ``pilot`` (pilot_personas) says how to size replies closer."""
    head = [
        "stage",
        "role",
        "model",
        "kind",
        "calls",
        "input tokens",
        "repeated prefix",
        "output tokens",
        "cost",
        "cost, prefix cached",
        "time",
    ]
    body = [
        [
            ln.stage,
            ln.role,
            ln.model,
            ln.kind,
            _n(ln.calls),
            _n(ln.prompt_tokens),
            _share(ln.prefix_tokens, ln.prompt_tokens),
            _n(ln.completion_tokens),
            fmt_usd(ln.cost_usd),
            fmt_usd(ln.cached_cost_usd),
            _t(ln.seconds),
        ]
        for ln in lines
    ] + [_total_row(lines)]
    widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in body]
    counted = sorted({ln.counted_by for ln in lines})
    out.append(
        f"{_sizing(lines, fill, replies_from, pilot)}; input tokens counted by "
        f"{' and '.join(counted) or 'nothing'}; repeated prefix: the share of input tokens that an earlier "
        f"prompt of the same engine began with (what a provider's prompt cache can serve); cost, prefix "
        f"cached: the cost if the provider served every repeated prefix at the file's cached_input price (a "
        f"floor: providers cache only long prefixes, e.g. from 1,024 tokens, and only while warm); time: "
        f"calls x {latency_s:g} s / concurrency, or the rate limits' floor; local engines cost nothing but "
        f"time. Training makes no model calls."
    )
    return "\n".join(out)
