"""Shared conversation plumbing: the user simulator's view, reply cleaning, the sampling of the
model under test, and running conversations each on its own."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed, wait

from aloe import prompts
from aloe.backends.base import Sampling

# The paper's evaluation code generates with the model's defaults and max_new_tokens=2048.
PAPER_MAX_NEW_TOKENS = 2048


def under_test_sampling(cfg) -> Sampling:
    """How a model under test samples (an ``EvaluateConfig``): ``protocol: paper`` uses the model's
    own default sampling and the paper's 2,048-token cap; otherwise greedy up to max_new_tokens."""
    if cfg.protocol == "paper":
        return Sampling(temperature=None, top_p=None, max_tokens=PAPER_MAX_NEW_TOKENS, seed=cfg.seed)
    return Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)


_STAGE = re.compile(
    r"\*[^*\n]{1,80}\*|\([^()\n]{0,40}(smiles|laughs|sighs|grins|nods|pauses)[^()\n]{0,40}\)", re.IGNORECASE
)


def clean_user_message(text: str) -> str:
    """Strip stage directions (*smiles*) and role labels the small model likes to add."""
    text = _STAGE.sub("", text)
    text = re.sub(r"^\s*(user|me|friend)\s*:\s*", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip().strip('"').strip()


def simulator_messages(profile: str, personality: str, history: list[dict], directive: str | None = None) -> list[dict]:
    """Messages for the user simulator. It plays the *user*, so roles are flipped:
    its own earlier lines are 'assistant', the assistant's replies are 'user'. ``directive``
    (aloe.preferences.plan_turn): what this message is to get across, a system message after the
    conversation (the persona and the conversation so far stay a prefix a provider can cache)."""
    p = prompts.get("user_simulator")
    msgs = [{"role": "system", "content": p.render("system", profile=profile, personality=personality)}]
    if not history:
        msgs.append({"role": "user", "content": p.render("opening")})
    for m in history:
        msgs.append({"role": "assistant" if m["role"] == "user" else "user", "content": m["content"]})
    if directive:
        msgs.append({"role": "system", "content": p.render("brief", directive=directive)})
    return msgs


def likelihood_prompts(
    profile: str, personality: str, history: list[dict], message: str
) -> tuple[list[dict], list[dict], str]:
    """The two prompts of the likelihood-ratio judge for a reply to ``message``: persona-aware
    and plain (they differ only by the persona), and the prompt version for the cache key."""
    p = prompts.get("judge_likelihood")
    tail = [*history, {"role": "user", "content": message}]
    return (
        [{"role": "system", "content": p.render("aware", profile=profile, personality=personality)}, *tail],
        [{"role": "system", "content": p.render("plain")}, *tail],
        p.tag,
    )


def dialogue_text(history: list[dict], user_message: str) -> str:
    """The conversation as plain text for prompts that show it (inference, the history rubric)."""
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in history]
    return "\n".join(lines + [f"User: {user_message}"])


def judge_persona(persona: dict) -> tuple[str, str]:
    """(profile, personality) as an LLM judge reads them: a persona with checkable preferences has
    them appended to its profile as the instructions a person would give, since the judge knows the
    whole persona. The persona's own text is never changed."""
    from aloe.preferences import described

    items = persona.get("preferences") or []
    profile = persona["profile"] + (" Wants: " + described(items) if items else "")
    return profile, persona["personality"]


def history_before(conv: dict, turn: int) -> list[dict]:
    """An evaluation conversation's messages before ``turn`` (a turn without a usable exchange
    is not part of it): what the model under test and the judges see at that turn."""
    out = []
    for t in conv["turns"]:
        if t["turn"] >= turn:
            break
        if t["user"] and t["reply"]:
            out += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["reply"]}]
    return out


# --------------------------------------------------------------------------- conversations on their own


def in_progress(engines) -> int:
    """How many conversations to keep in progress over HTTP engines: twice their slots
    (``max_concurrency`` per server), so the slots stay busy while some conversations wait between
    steps or for a retry; each engine's own limit still holds, so no more calls are in flight."""
    distinct = {id(e): e for e in engines if e is not None}
    return max(1, 2 * sum(getattr(e, "workers", 1) for e in distinct.values()))


class Outage:
    """Conversations in a row whose turn found no server. As many in a row as there are
    conversations in progress is an outage: ``stop`` is set (``run_each`` then starts nothing new)
    and ``raise_if_out`` raises the last such error once the work has ended."""

    def __init__(self, in_progress: int):
        self.limit, self.stop = in_progress, threading.Event()
        self._lock, self._row, self.error = threading.Lock(), 0, None

    def failed(self, error: Exception) -> None:
        with self._lock:
            self._row, self.error = self._row + 1, error
            if self._row >= self.limit:
                self.stop.set()

    def answered(self) -> None:
        with self._lock:
            self._row = 0

    def raise_if_out(self) -> None:
        if self.stop.is_set() and self.error is not None:
            raise self.error


def run_each(fn, items: list, workers: int, stop: threading.Event, name: str, grace_s: float = 30.0) -> None:
    """``fn(item)`` for every item, ``workers`` at a time. The first error, or Ctrl-C, sets ``stop``
    (``fn`` starts nothing new once it is set), cancels what has not started, waits up to ``grace_s``
    for what is under way (its answers are kept) and raises."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    futures = [pool.submit(fn, x) for x in items]
    try:
        for f in as_completed(futures):
            f.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        # a cancelled future never counts as done for wait(): waiting on it would take the whole grace
        wait([f for f in futures if not f.cancelled()], timeout=grace_s)
        raise
    finally:
        pool.shutdown(wait=False)
