"""ALOE summary metrics over per-turn alignment levels AL(1..K).

All functions take the per-turn alignment levels for turns k = 1..K as a sequence
of floats (the mean judge score at each turn).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Sequence

import numpy as np


def _check(al: Sequence[float]) -> list[float]:
    al = [float(x) for x in al]
    if len(al) < 2:
        raise ValueError(f"need AL for at least 2 turns, got {len(al)}")
    if any(math.isnan(x) for x in al):
        raise ValueError("AL contains NaN (a turn with no usable judgment)")
    return al


def _ols(y: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line of y on k = 1..K."""
    n = len(y)
    ks = range(1, n + 1)
    kbar = (n + 1) / 2
    ybar = sum(y) / n
    sxx = sum((k - kbar) ** 2 for k in ks)
    slope = sum((k - kbar) * (v - ybar) for k, v in zip(ks, y)) / sxx
    return slope, ybar - slope * kbar


def improvement_rate(al: Sequence[float]) -> float:
    """IR: ordinary least-squares slope of AL(k) on k = 1..K."""
    return _ols(_check(al))[0]


def _normalize(al: list[float]) -> list[float] | None:
    lo, hi = min(al), max(al)
    if hi == lo:
        return None
    return [(x - lo) / (hi - lo) for x in al]


def normalized_improvement_rate(al: Sequence[float]) -> float:
    """N-IR: the slope after min-max normalizing AL over the turns; 0.0 when AL is constant."""
    norm = _normalize(_check(al))
    return 0.0 if norm is None else _ols(norm)[0]


def normalized_r2(al: Sequence[float]) -> float:
    """N-R²: R² of the least-squares fit to the normalized AL curve; 0.0 when AL is constant."""
    norm = _normalize(_check(al))
    if norm is None:
        return 0.0
    slope, icept = _ols(norm)
    mean = sum(norm) / len(norm)
    ss_tot = sum((y - mean) ** 2 for y in norm)
    ss_res = sum((y - (icept + slope * k)) ** 2 for k, y in enumerate(norm, 1))
    return 1.0 - ss_res / ss_tot


def bootstrap_ci(
    values: Sequence[float], stat=None, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: mean) over the given units."""
    vals = list(values)
    if not vals:
        return (math.nan, math.nan)
    stat = stat or (lambda xs: sum(xs) / len(xs))
    rng = random.Random(seed)
    boots = sorted(stat([vals[rng.randrange(len(vals))] for _ in vals]) for _ in range(n_boot))
    lo = boots[int(math.floor(alpha / 2 * (n_boot - 1)))]
    hi = boots[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))]
    return (lo, hi)


def al_table(scores: dict[str, dict[int, float]], turns: int, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per-turn AL with n and a bootstrap CI over personas.

    ``scores[persona][turn]`` is that persona's score at that turn; missing
    judgments are simply absent and are reported through ``n``.
    """
    rows = []
    for k in range(1, turns + 1):
        vals = [s[k] for s in scores.values() if k in s and s[k] is not None]
        mean = sum(vals) / len(vals) if vals else math.nan
        lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed + k) if vals else (math.nan, math.nan)
        rows.append({"turn": k, "al": mean, "n": len(vals), "ci_low": lo, "ci_high": hi})
    return rows


def score_matrix(scores: dict[str, dict[int, float | None]], personas: list[str], turns: int) -> np.ndarray:
    """personas x turns array of scores; a missing judgment is NaN."""
    m = np.full((len(personas), turns), np.nan)
    for i, p in enumerate(personas):
        for k, v in (scores.get(p) or {}).items():
            if v is not None and 1 <= k <= turns:
                m[i, k - 1] = v
    return m


def curve_stats(al: np.ndarray) -> dict[str, np.ndarray]:
    """AVG, IR, N-IR and N-R² of every row of ``al`` (curves x turns), vectorized; a row with a
    NaN turn gives NaN everywhere (undefined, never made up), a flat row N-IR = N-R² = 0 as in
    :func:`normalized_improvement_rate` and :func:`normalized_r2`."""
    al = np.atleast_2d(np.asarray(al, dtype=float))
    k = np.arange(1, al.shape[1] + 1, dtype=float)
    kc = k - k.mean()
    sxx = (kc**2).sum()
    complete = ~np.isnan(al).any(axis=1)
    out = {"avg": np.where(complete, al.mean(axis=1), np.nan)}
    if al.shape[1] < 2:
        nan = np.full(al.shape[0], np.nan)
        return {**out, "ir": nan, "n_ir": nan, "n_r2": nan}
    out["ir"] = (al - al.mean(axis=1, keepdims=True)) @ kc / sxx
    lo, hi = al.min(axis=1, keepdims=True), al.max(axis=1, keepdims=True)
    span = hi - lo
    flat = (span == 0).ravel()
    norm = (al - lo) / np.where(span == 0, 1.0, span)
    slope = (norm - norm.mean(axis=1, keepdims=True)) @ kc / sxx
    fitted = norm.mean(axis=1, keepdims=True) + slope[:, None] * kc
    ss_res = ((norm - fitted) ** 2).sum(axis=1)
    ss_tot = ((norm - norm.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    out["n_ir"] = np.where(flat, 0.0, slope)
    out["n_r2"] = np.where(flat, 0.0, 1.0 - ss_res / np.where(ss_tot == 0, 1.0, ss_tot))
    for key in ("ir", "n_ir", "n_r2"):
        out[key] = np.where(complete, out[key], np.nan)
    return out


def _resampled_al(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AL curves of bootstrap resamples: idx is (resamples x personas) row indices into m."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a turn with no score in a resample: NaN
        return np.nanmean(m[idx], axis=1)


def _interval(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return (None, None)
    return (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))


def curve_bootstrap(
    scores: dict[str, dict[int, float | None]], turns: int, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap intervals of AVG, IR, N-IR and N-R², resampling personas (whole
    conversations); a resample whose curve is undefined at some turn is left out."""
    personas = list(scores)
    if not personas:
        return {k: (None, None) for k in ("avg", "ir", "n_ir", "n_r2")}
    m = score_matrix(scores, personas, turns)
    idx = np.random.default_rng(seed).integers(0, len(personas), size=(n_boot, len(personas)))
    stats = curve_stats(_resampled_al(m, idx))
    return {k: _interval(v, alpha) for k, v in stats.items()}


def paired_difference(
    a: dict[str, dict[int, float | None]],
    b: dict[str, dict[int, float | None]],
    turns: int,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Model a minus model b on the same personas: per turn, AVG and IR, each with a paired
    percentile bootstrap interval (one resample of personas drives both models, so what the
    personas share cancels). Personas that only one model has are left out and counted."""
    personas = [p for p in a if p in b]
    ma, mb = score_matrix(a, personas, turns), score_matrix(b, personas, turns)
    out: dict = {"n_personas": len(personas), "unpaired": len(set(a) ^ set(b))}
    if not personas:
        return {
            **out,
            "per_turn": [],
            **{f"{s}_diff{x}": None for s in ("avg", "ir") for x in ("", "_ci_low", "_ci_high")},
        }
    al_a, al_b = (
        _resampled_al(ma, np.arange(len(personas))[None, :]),
        _resampled_al(mb, np.arange(len(personas))[None, :]),
    )
    idx = np.random.default_rng(seed).integers(0, len(personas), size=(n_boot, len(personas)))
    ba, bb = _resampled_al(ma, idx), _resampled_al(mb, idx)
    per_turn = []
    for k in range(turns):
        lo, hi = _interval(ba[:, k] - bb[:, k], alpha)
        d = al_a[0, k] - al_b[0, k]
        both = int((~np.isnan(ma[:, k]) & ~np.isnan(mb[:, k])).sum())
        per_turn.append(
            {"turn": k + 1, "diff": None if np.isnan(d) else float(d), "ci_low": lo, "ci_high": hi, "n": both}
        )
    out["per_turn"] = per_turn
    sa, sb, boot_a, boot_b = curve_stats(al_a), curve_stats(al_b), curve_stats(ba), curve_stats(bb)
    for stat in ("avg", "ir"):
        d = sa[stat][0] - sb[stat][0]
        diffs = boot_a[stat] - boot_b[stat]
        lo, hi = _interval(diffs, alpha)
        out.update(
            {
                f"{stat}_diff": None if np.isnan(d) else float(d),
                f"{stat}_diff_ci_low": lo,
                f"{stat}_diff_ci_high": hi,
                f"{stat}_diff_mde": minimal_detectable(diffs),
            }
        )
    return out


def minimal_detectable(boot_diffs: np.ndarray, z_alpha: float = 1.96, z_power: float = 0.84) -> float | None:
    """The smallest true difference this design would detect with 80 % power at a two-sided 5 %
    level: (z_0.975 + z_0.8) x the bootstrap standard error of the paired difference."""
    d = boot_diffs[~np.isnan(boot_diffs)]
    if len(d) < 2:
        return None
    return float((z_alpha + z_power) * d.std(ddof=1))


def excludes_zero(lo: float | None, hi: float | None) -> bool:
    """True when an interval lies wholly above or below 0."""
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def summarize(scores: dict[str, dict[int, float | None]], turns: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything the report needs for one model: AL(k) with n and CIs; AVG, IR, N-IR and N-R², each
    with a bootstrap CI over personas.

    Missing judgments (None) are excluded and show up as a smaller n at their turn.
    """
    clean = {p: {k: v for k, v in s.items() if v is not None} for p, s in scores.items()}
    table = al_table(clean, turns, n_boot=n_boot, seed=seed)
    al = [r["al"] for r in table]
    usable = [a for a in al if not math.isnan(a)]
    out = {
        "al": table,
        "avg": sum(usable) / len(usable) if usable else math.nan,
        "n_personas": len(scores),
        "missing": sum(v is None for s in scores.values() for v in s.values()),
    }
    cis = curve_bootstrap(clean, turns, n_boot=n_boot, seed=seed)
    out.update(avg_ci_low=cis["avg"][0], avg_ci_high=cis["avg"][1])
    if len(al) >= 2 and len(usable) == len(al):
        out.update(ir=improvement_rate(al), n_ir=normalized_improvement_rate(al), n_r2=normalized_r2(al))
    else:
        out.update(ir=None, n_ir=None, n_r2=None)
    for stat in ("ir", "n_ir", "n_r2"):
        lo, hi = cis[stat] if out[stat] is not None else (None, None)
        out.update({f"{stat}_ci_low": lo, f"{stat}_ci_high": hi})
    return out


def fmt(v, digits: int = 3, sign: bool = False) -> str:
    """A number as every table and page prints it ("" for a missing one)."""
    if v is None:
        return ""
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def fmt_ci(lo, hi, digits: int = 3, sign: bool = False) -> str:
    """An interval as every table and page prints it: "[lo, hi]" ("" when either end is missing)."""
    return "" if lo is None or hi is None else f"[{fmt(lo, digits, sign)}, {fmt(hi, digits, sign)}]"
