"""Persona pool growth: iterative LLM self-generation with an embedding-diversity filter.

Each round samples k pool members as in-context examples, asks the LLM for n new
items of one kind, splits the reply into items, drops those of the wrong length or
kind, and keeps an item only if its cosine similarity to every pool member *and* to
the items already accepted this round is at most the threshold (MiniLM embeddings).

Each text is embedded once; pool embeddings live in one growing matrix, so a
candidate costs one matrix-vector product (the paper's code re-embeds the whole pool
for every candidate). Finished rounds are appended to ``rounds.jsonl``; a rerun
replays them (re-embedding only the kept texts) and continues with the next round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aloe import prompts
from aloe.backends import ChatBackend, ChatRequest, Sampling
from aloe.config import PersonasConfig
from aloe.embedding import Embedder
from aloe.errors import AloeError
from aloe.io import JsonlAppender, read_jsonl, write_jsonl
from aloe.records import item_id

_log = logging.getLogger(__name__)

_ITEM_PREFIX = re.compile(
    r"^\s*(?:[-*\u2022\u2013]|\(?\d{1,3}[.):]|#+|(?:profile|personality|persona)\s*\d*\s*[:.-])\s*", re.IGNORECASE
)
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|below (?:are|is)|these are|i hope)\b", re.IGNORECASE
)
_FACT_HINTS = re.compile(
    r"\b(\d{1,3}|years? old|works?|job|married|single|lives?|children|kids|son|daughter|"
    r"student|teacher|engineer|nurse|retired|husband|wife)\b",
    re.IGNORECASE,
)


def split_items(text: str) -> list[str]:
    """Split an LLM reply into items: numbered, bulleted, blank-line or line separated.

    Preambles ("Here are 20 new profiles:") and closing remarks are dropped; wrapping
    quotes and labels such as "Profile 3:" are stripped.
    """
    if not text:
        return []
    lines = [l.rstrip() for l in text.replace("\r\n", "\n").split("\n")]
    marked = [bool(_ITEM_PREFIX.match(l)) for l in lines]
    items: list[str] = []
    if sum(marked) >= 2:
        # list markers: an item runs from its marker to the next one (continuation lines join it)
        cur: list[str] | None = None
        for l, m in zip(lines, marked):
            if m:
                if cur:
                    items.append(" ".join(cur))
                cur = [_ITEM_PREFIX.sub("", l, count=1)]
            elif cur is not None and l.strip():
                cur.append(l.strip())
            elif cur is not None and not l.strip():
                items.append(" ".join(cur))
                cur = None
        if cur:
            items.append(" ".join(cur))
    else:
        blocks = re.split(r"\n\s*\n", text.strip())
        chunks = blocks if len(blocks) >= 2 else [l for l in lines if l.strip()]
        items = [" ".join(c.split()) for c in chunks]
    out = []
    for it in items:
        it = it.strip().strip("\"“”'").strip()
        it = re.sub(r"\s+", " ", it)
        if not it or (_PREAMBLE.match(it) and it.endswith(":")) or it.endswith(":"):
            continue
        out.append(it)
    return out


def kind_ok(kind: str, text: str, min_chars: int, max_chars: int) -> str | None:
    """None if the item is acceptable, otherwise the reason it is dropped."""
    if len(text) < min_chars:
        return "too short"
    if len(text) > max_chars:
        return "too long"
    if _PREAMBLE.match(text):
        return "preamble"
    facts = len(_FACT_HINTS.findall(text))
    if kind == "profile" and facts == 0:
        return "no facts (not a profile)"
    if kind == "personality" and re.search(r"\b\d{1,3}\b|years? old", text, re.IGNORECASE):
        return "has facts (not a personality)"
    return None


@dataclass
class DiversityFilter:
    """Pool embeddings in one growing matrix; accept if max cosine <= threshold."""

    threshold: float
    dim: int = 384
    ids: list[str] = field(default_factory=list)
    _mat: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        self._mat = np.zeros((64, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, item_id: str, emb: np.ndarray) -> None:
        n = len(self.ids)
        if n == self._mat.shape[0]:  # amortized doubling: no full copy per item
            self._mat = np.concatenate([self._mat, np.zeros_like(self._mat)])
        self._mat[n] = emb
        self.ids.append(item_id)

    def nearest(self, emb: np.ndarray) -> tuple[str | None, float]:
        n = len(self.ids)
        if n == 0:
            return None, -1.0
        sims = self._mat[:n] @ emb
        j = int(np.argmax(sims))
        return self.ids[j], float(sims[j])

    def offer(self, item_id: str, emb: np.ndarray) -> tuple[bool, str | None, float]:
        """Check against the pool (which already holds this round's accepted items) and add if diverse."""
        nn, sim = self.nearest(emb)
        ok = sim <= self.threshold + 1e-6  # float32 rounding must not flip a tie
        if ok:
            self.add(item_id, emb)
        return ok, nn, sim


def generation_messages(kind: str, examples: list[str], n: int) -> tuple[list[dict], str]:
    p = prompts.get(f"generate_{kind}")
    shown = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
    return (
        [
            {"role": "system", "content": p.render("system")},
            {"role": "user", "content": p.render("user", examples=shown, n=n)},
        ],
        p.tag,
    )


def _declared(name: str):
    """A growth knob's default, as the personas stage declares it (stated once, there)."""
    return PersonasConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class GrowthSettings:
    """One pool's growth: the personas stage's knobs of the same names, and the pool's target."""

    target: int
    examples_per_round: int = _declared("examples_per_round")
    items_per_round: int = _declared("items_per_round")
    requests_per_round: int = _declared("requests_per_round")
    threshold: float = _declared("threshold")
    max_rounds: int = _declared("max_rounds")
    saturation_window: int = _declared("saturation_window")
    saturation_floor: float = _declared("saturation_floor")
    min_chars: int = 60  # a generated item shorter than this is dropped (not a stage parameter)
    max_chars: int = 600  # ... or longer than this
    temperature: float = _declared("temperature")
    max_new_tokens: int = _declared("max_new_tokens")
    seed: int = _declared("seed")


def round_settings(
    kind: str, s: GrowthSettings, backend: ChatBackend | None, seeds: list[dict], blocked: list[dict]
) -> dict:
    """What made a growth round: the settings, the generator, the seeds and the blocked
    (benchmark) items. A round on disk with other settings is not replayed."""
    digest = hashlib.sha256(
        json.dumps([sorted(r["id"] for r in seeds), sorted(b["id"] for b in blocked)]).encode()
    ).hexdigest()[:16]
    return {
        "kind": kind,
        **{k: v for k, v in dataclasses.asdict(s).items() if k not in ("target", "max_rounds")},
        "generator": backend.identity() if backend is not None else None,
        "inputs": digest,
    }


def _saturated(rounds: list[dict], s: GrowthSettings) -> bool:
    last = rounds[-s.saturation_window :]
    if len(last) < s.saturation_window:
        return False
    offered = sum(r["offered"] for r in last)
    accepted = sum(len(r["accepted"]) for r in last)
    return offered == 0 or accepted / offered < s.saturation_floor


def _start_pool(
    seeds: list[dict],
    blocked: list[dict],
    replay: list[dict],
    embedder: Embedder,
    filt: DiversityFilter,
    texts: dict[str, str],
) -> list[dict]:
    """The pool before a new round: the blocked items in the filter only, then the seeds (with their
    nearest neighbour), then the items finished rounds accepted (replayed from the state file)."""
    pool: list[dict] = []
    for b, e in zip(blocked, embedder.encode_batch([b["text"] for b in blocked])):
        filt.add(b["id"], e)
    for rec, e in zip(seeds, embedder.encode_batch([r["text"] for r in seeds])):
        nn, sim = filt.nearest(e)
        filt.add(rec["id"], e)
        texts[rec["id"]] = rec["text"]
        pool.append({**rec, "nearest_id": nn, "nearest_sim": None if nn is None else round(sim, 4)})
    for rec, e in zip(replay, embedder.encode([a["text"] for a in replay])):
        filt.add(rec["id"], e)
        texts[rec["id"]] = rec["text"]
        pool.append(rec)
    return pool


def grow_pool(
    kind: str,
    seeds: list[dict],
    blocked: list[dict],
    backend: ChatBackend,
    embedder: Embedder,
    s: GrowthSettings,
    state_path: Path,
) -> tuple[list[dict], list[dict], str]:
    """Grow the pool of one kind; returns (pool records, round logs, why it stopped).

    ``blocked`` items (the evaluation personas) take part in the similarity check but
    never enter the pool or serve as examples, so nothing generated comes within the
    threshold of a benchmark persona.
    """
    filt = DiversityFilter(s.threshold)
    texts: dict[str, str] = {}
    fp = round_settings(kind, s, backend, seeds, blocked)
    rounds = _finished_rounds(kind, s, fp, state_path)
    pool = _start_pool(seeds, blocked, [a for r in rounds for a in r["accepted"]], embedder, filt, texts)
    stop = "round limit"
    with JsonlAppender(state_path) as log:
        for rnd in range(len(rounds) + 1, s.max_rounds + 1):
            if len(pool) >= s.target:
                stop = "target"
                break
            if _saturated(rounds, s):
                stop = "saturation"
                break
            outs, n_requests, tag = _generate_round(kind, rnd, pool, backend, s, state_path)
            cands, raw, dropped = _candidates(kind, outs, s)
            accepted = _accept(
                kind, rnd, cands, embedder, filt, texts, dropped, {"generator": backend.model_id, "prompt_version": tag}
            )
            pool.extend(accepted)
            entry = {
                "kind": kind,
                "round": rnd,
                "settings": fp,
                "requests": n_requests,
                "failed_requests": 0,
                "candidates": raw,
                "offered": len(cands),
                "dropped": dropped,
                "accepted": accepted,
                "pool_size": len(pool),
            }
            log.append(entry)
            rounds.append(entry)
        else:
            stop = "target" if len(pool) >= s.target else "round limit"
    return pool, rounds, stop


def _candidates(kind: str, outs: list, s: GrowthSettings) -> tuple[list[str], int, dict[str, int]]:
    """The items of one round's replies that pass the kind's checks; how many items there were;
    why the others were dropped."""
    dropped: dict[str, int] = {}
    cands: list[str] = []
    raw = 0
    for o in outs:
        for it in split_items(o.text or ""):
            raw += 1
            why = kind_ok(kind, it, s.min_chars, s.max_chars)
            if why:
                dropped[why] = dropped.get(why, 0) + 1
            else:
                cands.append(it)
    return cands, raw, dropped


def _accept(
    kind: str,
    rnd: int,
    cands: list[str],
    embedder: Embedder,
    filt: DiversityFilter,
    texts: dict[str, str],
    dropped: dict[str, int],
    made_by: dict,
) -> list[dict]:
    """The candidates the diversity filter admits, in order, each admitted one joining the filter
    (and ``texts``) before the next is offered; the rest counted in ``dropped``."""
    accepted = []
    for text, e in zip(cands, embedder.encode(cands)):
        iid = item_id(kind, text)
        if iid in texts:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
            continue
        ok, nn, sim = filt.offer(iid, e)
        if not ok:
            dropped["too similar"] = dropped.get("too similar", 0) + 1
            continue
        texts[iid] = text
        accepted.append(
            {
                "id": iid,
                "kind": kind,
                "text": text,
                "source": "generated",
                "split": "train",
                "round": rnd,
                "nearest_id": nn,
                "nearest_sim": round(sim, 4),
                **made_by,
            }
        )
    return accepted


def _finished_rounds(kind: str, s: GrowthSettings, fp: dict, state_path: Path) -> list[dict]:
    """The finished rounds of this kind made with these settings, to replay (personas.run has
    already dropped the others; their LLM calls are cached anyway); rounds made otherwise are
    removed from the state file, with a warning naming what changed."""
    on_disk = read_jsonl(state_path, allow_torn_tail=True) if state_path.exists() else []
    mine = [r for r in on_disk if r["kind"] == kind]
    rounds = [r for r in mine if r.get("settings") == fp] if s.max_rounds > 0 else []
    if len(rounds) != len(mine):  # growth now off, or other settings: those rounds are not this pool's
        old = next((r.get("settings") or {} for r in mine if r.get("settings") != fp), {})
        changed = sorted(k for k in fp if old.get(k) != fp[k]) if s.max_rounds > 0 else ["growth is off"]
        _log.warning(
            "%s: %d %s round(s) made with other settings (%s) are dropped",
            state_path,
            len(mine) - len(rounds),
            kind,
            ", ".join(changed) or "unrecorded",
        )
        write_jsonl(state_path, [r for r in on_disk if r["kind"] != kind] + rounds)
    return rounds


def _generate_round(
    kind: str, rnd: int, pool: list[dict], backend: ChatBackend, s: GrowthSettings, state_path: Path
) -> tuple[list, int, str]:
    """One round's generation requests (examples drawn from the pool, seeded per round so a resumed
    run draws the same), asked up to three times; a round with a failed request fails the stage."""
    rng = random.Random(f"{s.seed}-{kind}-{rnd}")
    reqs, tag = [], ""
    for j in range(s.requests_per_round):
        examples = rng.sample([p["text"] for p in pool], min(s.examples_per_round, len(pool)))
        msgs, tag = generation_messages(kind, examples, s.items_per_round)
        reqs.append(
            ChatRequest(
                msgs,
                Sampling(temperature=s.temperature, max_tokens=s.max_new_tokens, seed=s.seed),
                sample_index=rnd * 1000 + j,
                prompt_version=tag,
            )
        )
    outs = backend.chat(reqs)
    for _ in range(2):  # failed requests are asked again (the others come from the cache)
        if all(o.ok for o in outs):
            break
        outs = backend.chat(reqs)
    failed = [o.error for o in outs if not o.ok]
    if failed:  # never a round built on holes: the stage fails, a rerun retries this round
        raise AloeError(
            f"growing {kind}s, round {rnd}: {len(failed)} of {len(reqs)} generation requests "
            f"failed after 3 tries ({str(failed[0])[:160]}); finished rounds are kept in "
            f"{state_path}: rerun to go on"
        )
    return outs, len(reqs), tag
