"""Checkable preferences: the exact ruler.

A persona may carry, besides its free-text profile and personality, a few preferences that a
program can check on any reply (``preferences.yaml``: keep it short, bullet points, no emoji,
vegetarian, metric units, ...). Because the right answer is known by construction, they give

* an exact judge (``pair_judge: rules`` in trees, ``score_judge: rules`` in evaluation): a reply's score is the share of the persona's preferences it
  satisfies, out of those that apply, mapped to 1-5 as ``1 + 4 * share``;
* known-answer pairs for any LLM judge (a satisfying reply against a minimal edit that violates
  one preference), which the judge card uses;
* a disclosure the scorer can trust: the simulated user is told which preference to get across on
  which turn, and a detector checks that its message did.

Everything here is deterministic: the draw, the schedule, the checkers and the edits depend only
on their inputs (persona ids and a seed), never on global state.

A checker returns one of ``SATISFIED``, ``VIOLATED`` or ``NA`` (the topic did not come up: content
preferences only). Conventions, tested in ``tests/test_preferences.py``:

* fenced code blocks and inline code are not prose: punctuation, emoji and contractions inside
  them do not count; the word cap counts every word;
* an empty reply violates every form preference (it satisfies nobody) and leaves content
  preferences not applicable.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml

from aloe.errors import AloeError

CATALOGUE = Path(__file__).parent / "preferences.yaml"
SATISFIED, VIOLATED, NA = "satisfied", "violated", "n/a"


@dataclass(frozen=True)
class Preference:
    id: str
    kind: str  # "form" or "content"
    check: str
    params: dict
    instruction: str
    reveal: tuple[str, ...]
    complaint: str
    detect: tuple[str, ...]
    exclusive_with: tuple[str, ...]
    satisfies: str
    violates: str


@dataclass(frozen=True)
class Catalogue:
    version: str
    names: tuple[str, ...]
    items: dict[str, Preference]

    def __getitem__(self, pid: str) -> Preference:
        if pid not in self.items:
            raise AloeError(f"unknown preference {pid!r}; the catalogue ({CATALOGUE.name}) has {', '.join(self.items)}")
        return self.items[pid]


@lru_cache(maxsize=None)
def catalogue() -> Catalogue:
    """The catalogue in ``preferences.yaml``, checked: every field present, every checker known,
    exclusions symmetric."""
    data = yaml.safe_load(CATALOGUE.read_text(encoding="utf-8"))
    items = {}
    for pid, e in data["preferences"].items():
        where = f"{CATALOGUE}: preferences.{pid}"
        missing = [
            k for k in ("kind", "check", "instruction", "reveal", "complaint", "detect", "examples") if k not in e
        ]
        if missing:
            raise AloeError(f"{where}: missing {', '.join(missing)}")
        if e["kind"] not in ("form", "content"):
            raise AloeError(f"{where}.kind: {e['kind']!r}; allowed: form, content")
        if e["check"] not in CHECKS:
            raise AloeError(f"{where}.check: {e['check']!r} is not a checker; known: {', '.join(CHECKS)}")
        items[pid] = Preference(
            pid,
            e["kind"],
            e["check"],
            dict(e.get("params") or {}),
            e["instruction"],
            tuple(e["reveal"]),
            e["complaint"],
            tuple(e["detect"]),
            tuple(e.get("exclusive_with") or ()),
            e["examples"]["satisfies"],
            e["examples"]["violates"],
        )
    for p in items.values():
        for q in p.exclusive_with:
            if q not in items or p.id not in items[q].exclusive_with:
                raise AloeError(
                    f"{CATALOGUE}: preferences.{p.id}.exclusive_with: {q!r} must exist and name {p.id!r} back"
                )
    return Catalogue(str(data["version"]), tuple(data["names"]), items)


# --------------------------------------------------------------------------- text helpers

_FENCE = re.compile(r"```.*?(```|$)", re.DOTALL)
_INLINE = re.compile(r"`[^`\n]*`")
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u2300-\u23ff\ufe0f\u200d]"
    r"|(?<![\w:])[:;]-?[)(DPp](?![\w(])"
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•·‣▪]|\d{1,3}[.)])\s+\S", re.MULTILINE)
_APOS = "'\u2019"
_CONTRACTION = re.compile(
    rf"\b\w+(?:n[{_APOS}]t|[{_APOS}](?:re|ve|ll|d|m))\b"
    rf"|\b(?:it|that|what|there|here|he|she|let|who|where|how|when|why|this|everything|"
    rf"nothing|someone|something)[{_APOS}]s\b",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\W*(great|good|excellent|interesting|what a great|what an?|that'?s a (great|good)|sure|of course|certainly|"
    r"absolutely|hi|hello|hey|thanks|thank you|oh|wow|ah|well|i'?m sorry|i understand|i see|as an ai|"
    r"i'?d be (happy|glad)|i'?m (happy|glad)|happy to help|glad you asked|it sounds like|it'?s great)\b",
    re.IGNORECASE,
)


def prose(text: str) -> str:
    """The reply without code: fenced blocks and inline code removed."""
    return _INLINE.sub(" ", _FENCE.sub(" ", text or ""))


def words(text: str) -> int:
    return len((text or "").split())


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def _words_re(ws: str) -> re.Pattern:
    return re.compile(r"\b(" + ws + r")\b", re.IGNORECASE)


_FOOD = _words_re(
    r"food|foods|dinner|dinners|lunch|breakfast|brunch|meal|meals|recipe|recipes|cook|cooking|cooked|"
    r"bake|baking|dish|dishes|snack|snacks|eat|eating|restaurant|menu|salad|pasta|soup|stew|curry|"
    r"sandwich|burger|pizza|tacos?|stir-?fry|grill|grilled|bbq|barbecue|protein|ingredients?"
)
_MEAT = _words_re(
    r"meat|meats|chicken|beef|pork|bacon|ham|steak|turkey|lamb|sausages?|salami|pepperoni|"
    r"prosciutto|veal|duck|fish|salmon|tuna|cod|shrimp|prawns?|seafood|anchov(y|ies)|crab|lobster|"
    r"mince|meatballs?|brisket|ribs|chorizo|jerky|venison|goose"
)
_NOT_MEAT = re.compile(
    r"\b(no|without|instead of|free of|skip(ping)?( the)?|meat-?free|meatless|plant-based|vegan|"
    r"vegetarian|mock|fake|veggie)\s+(\w+\s+)?(?=\w)|\b\w+-free\b|\bmeatless\b",
    re.IGNORECASE,
)
_MONEY = _words_re(
    r"buy|buying|bought|price|prices|pricey|cost|costs|costly|expensive|purchase|ticket|tickets|"
    r"subscription|membership|fee|fees|pay|paying|spend|spending|afford|shop|shopping|store|"
    r"budget|cheap|cheaper|free|affordable|inexpensive|premium|luxury|high-end|designer|"
    r"dollars?|euros?|pounds sterling|bucks|money|gym|studio|class|classes|course|hotel|restaurant"
)
_MONEY_SIGN = re.compile(r"[$€£¥]\s?\d|\d\s?[$€£¥]")
_CHEAP = _words_re(
    r"free|cheap|cheaper|cheapest|budget|affordable|inexpensive|low-cost|low cost|bargain|discounts?|"
    r"second-hand|secondhand|thrift|used|library|libraries|no cost|at no charge|for nothing|deal|"
    r"sale|save money|saving money"
)
_NUM = r"(\d+(?:[.,]\d+)?|one|two|three|four|five|six|seven|eight|nine|ten|a few|a couple of|half an?)"
_IMPERIAL = re.compile(
    r"\b(miles?|mph|pounds?|lbs?|ounces?|oz|feet|foot|ft|inch(es)?|yards?|gallons?|pints?|quarts?"
    r"|fahrenheit|°\s?f)\b|°F|\d\s?°?F\b",
    re.IGNORECASE,
)
_METRIC = re.compile(
    r"\b(kilomet(re|er)s?|km|kilo(gram)?s?|kg|grams?|g|met(re|er)s?|m|centimet(re|er)s?|cm|"
    r"millimet(re|er)s?|mm|lit(re|er)s?|l|ml|millilit(re|er)s?|celsius|°\s?c|km/h)\b|°C",
    re.IGNORECASE,
)
_QUANTITY = re.compile(rf"\b{_NUM}\s*({_METRIC.pattern}|{_IMPERIAL.pattern})", re.IGNORECASE)


# --------------------------------------------------------------------------- checkers


def check_max_words(text: str, params: dict, ctx: dict) -> str:
    return SATISFIED if words(text) <= params["max_words"] else VIOLATED


def check_list(text: str, params: dict, ctx: dict) -> str:
    return SATISFIED if len(_LIST_ITEM.findall(prose(text))) >= params.get("min_items", 2) else VIOLATED


def check_no_questions(text: str, params: dict, ctx: dict) -> str:
    return VIOLATED if "?" in prose(text) else SATISFIED


def check_ends_question(text: str, params: dict, ctx: dict) -> str:
    tail = _EMOJI.sub("", prose(text)).rstrip(" \t\n\"')]*_\u201d\u2019")
    return SATISFIED if tail.endswith("?") else VIOLATED


def check_no_emoji(text: str, params: dict, ctx: dict) -> str:
    return VIOLATED if _EMOJI.search(prose(text)) else SATISFIED


def check_no_exclamation(text: str, params: dict, ctx: dict) -> str:
    return VIOLATED if "!" in prose(text) or "\u00a1" in prose(text) else SATISFIED


def check_no_contractions(text: str, params: dict, ctx: dict) -> str:
    return VIOLATED if _CONTRACTION.search(prose(text)) else SATISFIED


def check_answer_first(text: str, params: dict, ctx: dict) -> str:
    sents = _sentences(prose(text))
    if not sents:
        return VIOLATED
    first = sents[0]
    return VIOLATED if _PREAMBLE.match(first) or first.rstrip().endswith("?") else SATISFIED


def check_uses_name(text: str, params: dict, ctx: dict) -> str:
    name = ctx.get("name")
    if not name:
        raise AloeError("the 'name' preference needs the persona's name (preferences: [{id: name, name: ...}])")
    return SATISFIED if re.search(rf"\b{re.escape(name)}\b", text or "", re.IGNORECASE) else VIOLATED


def check_vegetarian(text: str, params: dict, ctx: dict) -> str:
    t = prose(text)
    cleaned = _NOT_MEAT.sub(" ", t)
    if _MEAT.search(cleaned):
        return VIOLATED
    return SATISFIED if _FOOD.search(t) else NA


def check_budget(text: str, params: dict, ctx: dict) -> str:
    t = re.sub(r"\b(feel free|free time|free to)\b", " ", prose(text), flags=re.IGNORECASE)
    if not (_MONEY.search(t) or _MONEY_SIGN.search(t)):
        return NA
    return SATISFIED if _CHEAP.search(t) else VIOLATED


def check_metric(text: str, params: dict, ctx: dict) -> str:
    t = prose(text)
    if _IMPERIAL.search(t):
        return VIOLATED
    return SATISFIED if _QUANTITY.search(t) else NA


CHECKS: dict[str, Callable[[str, dict, dict], str]] = {
    "max_words": check_max_words,
    "list": check_list,
    "no_questions": check_no_questions,
    "ends_question": check_ends_question,
    "no_emoji": check_no_emoji,
    "no_exclamation": check_no_exclamation,
    "no_contractions": check_no_contractions,
    "answer_first": check_answer_first,
    "uses_name": check_uses_name,
    "vegetarian": check_vegetarian,
    "budget": check_budget,
    "metric": check_metric,
}


def check(item: dict, reply: str) -> str:
    """One persona preference (``{"id": ..., "name": ...}``) on one reply. An empty reply satisfies
    nobody: it violates a form preference and leaves a content one not applicable."""
    p = catalogue()[item["id"]]
    if not (reply or "").strip():
        return VIOLATED if p.kind == "form" else NA
    return CHECKS[p.check](reply, p.params, item)


def check_all(items: list[dict], reply: str) -> dict[str, str]:
    return {i["id"]: check(i, reply) for i in items}


# --------------------------------------------------------------------------- minimal violating edits

_CONTRACT = [
    (r"\bdo not\b", "don't"),
    (r"\bI am\b", "I'm"),
    (r"\bit is\b", "it's"),
    (r"\byou are\b", "you're"),
    (r"\bis not\b", "isn't"),
    (r"\bcannot\b", "can't"),
    (r"\bI would\b", "I'd"),
    (r"\bwill not\b", "won't"),
    (r"\bthat is\b", "that's"),
    (r"\byou will\b", "you'll"),
    (r"\bwe are\b", "we're"),
    (r"\bthere is\b", "there's"),
    (r"\bI will\b", "I'll"),
    (r"\byou would\b", "you'd"),
]
_PRICEY = {
    "free": "premium",
    "cheap": "luxury",
    "cheaper": "pricier",
    "cheapest": "priciest",
    "budget": "designer",
    "affordable": "high-end",
    "inexpensive": "expensive",
    "low-cost": "high-end",
    "low cost": "high cost",
    "bargain": "splurge",
    "discount": "full-price",
    "discounts": "full prices",
    "second-hand": "brand-new",
    "secondhand": "brand-new",
    "thrift": "boutique",
    "used": "new",
    "library": "bookshop",
    "libraries": "bookshops",
    "no cost": "a high cost",
    "deal": "splurge",
    "sale": "full price",
}
_IMPERIAL_OF = [
    (r"\bkilomet(re|er)s\b", "miles"),
    (r"\bkilomet(re|er)\b", "mile"),
    (r"\bkm\b", "miles"),
    (r"\bkilograms?\b", "pounds"),
    (r"\bkilos?\b", "pounds"),
    (r"\bkg\b", "lbs"),
    (r"°C", "°F"),
    (r"\bcelsius\b", "Fahrenheit"),
    (r"\bcentimet(re|er)s?\b", "inches"),
    (r"\bcm\b", "inches"),
    (r"\bmet(re|er)s?\b", "feet"),
    (r"\blit(re|er)s?\b", "gallons"),
    (r"\bgrams?\b", "ounces"),
    (r"\bml\b", "fl oz"),
    (r"\bm\b", "ft"),
    (r"\bg\b", "oz"),
]


def _say_again(item: dict, params: dict, reply: str) -> str:
    out = reply
    while out and words(out) <= params["max_words"]:
        out = f"{out} {reply}"  # the reply said again: the length doubled (or more)
    return out


def _unlist(item: dict, params: dict, reply: str) -> str:
    items = [re.sub(r"^\s*(?:[-*•·‣▪]|\d{1,3}[.)])\s+", "", ln).strip() for ln in reply.splitlines()]
    return " ".join(
        x.rstrip(".;") + ";" if i < len(items) - 1 and _LIST_ITEM.match(ln) else x
        for i, (x, ln) in enumerate(zip(items, reply.splitlines()))
        if x
    )


def _drop_last_question(item: dict, params: dict, reply: str) -> str | None:
    i = reply.rstrip().rfind("?")
    return reply.rstrip()[:i] + "." if i >= 0 else None


def _exclaim(item: dict, params: dict, reply: str) -> str:
    r = reply.rstrip()
    return r[:-1] + "!" if r.endswith(".") else r + "!"


def _contract(item: dict, params: dict, reply: str) -> str:
    for pat, rep in _CONTRACT:
        if re.search(pat, reply):
            return re.sub(pat, rep, reply, count=1)
    return "Here's my suggestion: " + reply.lstrip()


def _drop_name(item: dict, params: dict, reply: str) -> str:
    name = re.escape(item["name"])
    out = re.sub(rf",?\s*\b{name}\b\s*,?", " ", reply, flags=re.IGNORECASE)
    out = re.sub(r"\s+([.,!?])", r"\1", re.sub(r"[ \t]+", " ", out)).strip()
    return out[:1].upper() + out[1:]


def _add_meat(item: dict, params: dict, reply: str) -> str:
    swap = re.subn(
        r"\b(tofu|tempeh|lentils?|chickpeas?|beans|mushrooms?|vegetables|veggies|paneer|halloumi|"
        r"eggplant|aubergine)\b",
        "chicken",
        reply,
        count=1,
        flags=re.IGNORECASE,
    )
    return swap[0] if swap[1] else reply.rstrip() + " Add some grilled chicken."


def _imperial(item: dict, params: dict, reply: str) -> str:
    out = reply
    for pat, rep in _IMPERIAL_OF:
        out, n = re.subn(pat, rep, out, count=1, flags=re.IGNORECASE if pat != r"°C" else 0)
        if n:
            break
    return out


# check -> a minimal edit of a reply that satisfies it, meant to violate it (violate() verifies)
_EDITS = {
    "max_words": _say_again,
    "list": _unlist,
    "no_questions": lambda item, params, reply: reply.rstrip() + " What do you think?",
    "ends_question": _drop_last_question,
    "no_emoji": lambda item, params, reply: reply.rstrip() + " 🙂",
    "no_exclamation": _exclaim,
    "no_contractions": _contract,
    "answer_first": lambda item, params, reply: "Great question. " + reply.lstrip(),
    "uses_name": _drop_name,
    "vegetarian": _add_meat,
    "budget": lambda item, params, reply: _CHEAP.sub(lambda m: _PRICEY.get(m.group(0).lower(), "expensive"), reply),
    "metric": _imperial,
}


def violate(item: dict, reply: str) -> str | None:
    """A minimal edit of ``reply`` (which satisfies ``item``) that violates it, or None when no such
    edit applies. The result is checked: what comes back violates the preference."""
    p = catalogue()[item["id"]]
    edit = _EDITS.get(p.check)
    out = edit(item, p.params, reply) if edit is not None else None
    if out is None or out == reply or check(item, out) != VIOLATED:
        return None
    return out


# --------------------------------------------------------------------------- personas: draw and schedule


def draw(persona_id: str, low: int, high: int, seed: int = 0) -> list[dict]:
    """``low``..``high`` preferences for one persona, by a seeded rule: the same persona id and
    seed always draw the same, mutually exclusive preferences are never drawn together, and at
    least one is a form preference (so every reply has something that applies)."""
    cat = catalogue()
    rng = random.Random(f"aloe-preferences/{cat.version}/{seed}/{persona_id}")
    k = rng.randint(low, high)
    order = sorted(cat.items)
    rng.shuffle(order)
    chosen: list[str] = []
    for pid in order:
        if len(chosen) == k:
            break
        if any(pid in cat[c].exclusive_with for c in chosen):
            continue
        chosen.append(pid)
    if not any(cat[c].kind == "form" for c in chosen):
        chosen[-1] = next(p for p in order if cat[p].kind == "form" and p not in chosen)
    out = []
    for pid in chosen:
        item = {"id": pid}
        if cat[pid].check == "uses_name":
            item["name"] = rng.choice(cat.names)
        out.append(item)
    return out


def assign(pairs: list[dict], per_persona: tuple[int, ...], seed: int, source: str) -> list[dict]:
    """``pairs`` with a ``preferences`` list and the ``preference_draw`` that made it (no change to
    the persona text). ``per_persona`` is (low, high); () leaves the pairs without preferences."""
    if not per_persona:
        return pairs
    low, high = per_persona
    draw_info = {"version": catalogue().version, "seed": seed, "per_persona": [low, high], "source": source}
    return [{**p, "preferences": draw(p["id"], low, high, seed), "preference_draw": draw_info} for p in pairs]


def schedule(persona_id: str, items: list[dict], turns: int, seed: int = 0) -> dict[int, str]:
    """turn -> the preference the simulated user reveals on that turn: at most one new preference
    per turn, on turns drawn by a seeded rule; with more preferences than turns, the rest stay
    unrevealed (the judge still knows them, as ALOE's judge knows the whole persona)."""
    rng = random.Random(f"aloe-schedule/{catalogue().version}/{seed}/{persona_id}")
    ids = [i["id"] for i in items]
    rng.shuffle(ids)
    n = min(len(ids), turns)
    when = sorted(rng.sample(range(1, turns + 1), n))
    return dict(zip(when, ids[:n]))


def described(items: list[dict]) -> str:
    """The preferences as the instructions a person would give (for LLM judges and hints)."""
    cat = catalogue()
    return " ".join(cat[i["id"]].instruction.format(name=i.get("name", "")) for i in items)


# --------------------------------------------------------------------------- disclosure


def _detectors(item: dict) -> list[re.Pattern]:
    name = re.escape(item.get("name") or "")
    return [re.compile(d.replace("{name}", name), re.IGNORECASE) for d in catalogue()[item["id"]].detect]


def conveys(item: dict, message: str) -> bool:
    """Does a user message get this preference across? (the per-preference detector)"""
    text = unicodedata.normalize("NFC", message or "").replace("\u2019", "'")
    return any(d.search(text) for d in _detectors(item))


def phrasing(item: dict, which: str, key: str) -> str:
    """A reveal phrasing (chosen by a seeded rule from ``key``) or the complaint, with the name filled in."""
    p = catalogue()[item["id"]]
    text = p.complaint if which == "complaint" else random.Random(key).choice(p.reveal)
    return text.format(name=item.get("name", ""))


@dataclass(frozen=True)
class UserPlan:
    """What the simulated user is to get across on one turn."""

    new: str | None  # the preference revealed on this turn
    complaint: str | None  # a revealed preference the last reply violated
    directive: str | None  # the instruction added to the simulator's prompt


def plan_turn(pair: dict, turns: int, turn: int, seed: int, revealed: list[str], last_reply: str | None) -> UserPlan:
    """The simulated user's brief for ``turn``: the scheduled preference, and a complaint about the
    first already revealed preference that the previous reply violated."""
    items = pair.get("preferences") or []
    if not items:
        return UserPlan(None, None, None)
    by_id = {i["id"]: i for i in items}
    new = schedule(pair["id"], items, turns, seed).get(turn)
    complaint = None
    if last_reply is not None:
        complaint = next((r for r in revealed if r in by_id and check(by_id[r], last_reply) == VIOLATED), None)
    parts = []
    if new is not None:
        parts.append(f'Also get this across in your own words: "{phrasing(by_id[new], "reveal", pair["id"] + new)}"')
    if complaint is not None:
        parts.append(
            f"The assistant ignored something you asked for; say so briefly: "
            f'"{phrasing(by_id[complaint], "complaint", "")}"'
        )
    return UserPlan(new, complaint, " ".join(parts) or None)


def settle_message(pair: dict, plan: UserPlan, message: str, revealed: list[str], fallback: bool) -> tuple[str, dict]:
    """The user's message after the detector: whether it conveyed the scheduled preference, the
    catalogue's phrasing appended when it did not and ``fallback`` is on, and what is revealed by
    now (a preference counts as revealed only when a message conveyed it). Returns the message and
    the turn's disclosure record."""
    items = {i["id"]: i for i in pair.get("preferences") or []}
    conveyed = appended = None
    if plan.new is not None:
        conveyed = conveys(items[plan.new], message)
        if not conveyed and fallback:
            message = f"{message.rstrip()} {phrasing(items[plan.new], 'reveal', pair['id'] + plan.new)}".strip()
            appended = True
    # any preference the message conveys counts, scheduled or not (a user may repeat one)
    now = list(revealed) + [pid for pid, it in items.items() if pid not in revealed and conveys(it, message)]
    record = {
        "meant": plan.new,
        "conveyed": conveyed,
        "appended": bool(appended),
        "complaint": plan.complaint,
        "revealed": now,
    }
    return message, record


# --------------------------------------------------------------------------- the rules judge


def judge_description() -> dict:
    """The rules judge where a role's engine would be described (manifests, provenance, the card)."""
    return {"kind": "rules", "model": "aloe.preferences", "revision": catalogue().version}


def disclosure_counts(records: list[dict]) -> dict[str, int]:
    """Over turns' disclosure records (:func:`settle_message`): reveals scheduled, conveyed in the
    simulated user's own words, appended from the catalogue, and complaints."""
    return {
        "scheduled": sum(r["meant"] is not None for r in records),
        "conveyed": sum(bool(r["conveyed"]) for r in records),
        "appended": sum(bool(r["appended"]) for r in records),
        "complaints": sum(r["complaint"] is not None for r in records),
    }


def rules_score(items: list[dict], reply: str, revealed: list[str] | None = None) -> dict:
    """The exact judge: score = 1 + 4 x (share of the persona's applicable preferences satisfied);
    ``revealed_share``: the same over the preferences revealed so far (None when none apply)."""
    checks = check_all(items, reply)
    applicable = [s for s in checks.values() if s != NA]
    share = sum(s == SATISFIED for s in applicable) / len(applicable) if applicable else None
    shown = [checks[r] for r in (revealed or []) if r in checks and checks[r] != NA]
    return {
        "score": None if share is None else 1 + 4 * share,
        "share": share,
        "revealed_share": sum(s == SATISFIED for s in shown) / len(shown) if shown else None,
        "n_applicable": len(applicable),
        "checks": checks,
        "method": "rules",
        "version": catalogue().version,
    }
