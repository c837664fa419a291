"""What model calls cost: a priced model's tokens times its list price (``prices:`` in the parameter
file, USD per million tokens). Local engines cost nothing but time; a served model without a price
has an unknown cost (None), never a made-up one.

Used after a run (manifests' ``usage`` rows, the results page's "Model calls" table, with what the
call cache saved) and before one (``aloe estimate``).
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from aloe.config import Price

# engines that run here: no bill
LOCAL_KINDS = ("transformers", "vllm", "scripted")


def usd(prompt_tokens: float, completion_tokens: float, price: Price) -> float:
    return (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


def prefix_discount(prefix_tokens: float, price: Price | None) -> float:
    """USD a provider's prompt cache takes off when it serves ``prefix_tokens`` input tokens at the
    cached price instead of the list price (0 with no price or no cached price)."""
    if price is None or price.cached_input is None:
        return 0.0
    return prefix_tokens * max(0.0, price.input - price.cached_input) / 1e6


def row_cost(row: Mapping, prices: Mapping[str, Price]) -> tuple[float | None, float | None]:
    """(cost of the calls sent, cost the call cache saved) of one usage row; (0, 0) on a local
    engine, (None, None) for a served model with no price."""
    if row.get("kind") in LOCAL_KINDS:
        return 0.0, 0.0
    price = prices.get(row.get("model"))
    if price is None:
        return None, None
    return (
        usd(row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0, price),
        usd(row.get("cached_prompt_tokens") or 0, row.get("cached_completion_tokens") or 0, price),
    )


def with_cost(rows: Iterable[Mapping], prices: Mapping[str, Price]) -> list[dict]:
    """Usage rows (Roles.usage) with ``cost_usd`` and ``saved_usd`` added."""
    out = []
    for r in rows:
        cost, saved = row_cost(r, prices)
        out.append(
            {
                **r,
                "cost_usd": None if cost is None else round(cost, 4),
                "saved_usd": None if saved is None else round(saved, 4),
            }
        )
    return out


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "unknown (no price)"
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def progress_line(
    what: str,
    done: int,
    total: int,
    new: int,
    started: float,
    failed: int,
    usage: Iterable[Mapping],
    prices: Mapping[str, Price],
) -> str:
    """One line a long stage logs as it goes: done of total, the rate of this run (``new`` units
    done since ``started``), the time left at that rate, failures and cost so far."""
    elapsed = max(time.time() - started, 1e-9)
    rate = new / elapsed
    eta = (total - done) / rate if rate > 0 else None
    costs = [row_cost(u, prices)[0] for u in usage]
    cost = None if any(c is None for c in costs) else sum(costs)
    return (
        f"{what}: {done}/{total} done, {rate * 60:.1f}/min, about {fmt_duration(eta)} left, {failed} failed, "
        f"cost so far {fmt_usd(cost)}"
    )
