"""Every figure the notebooks and the results page show, in one place.

Each function draws from a stage's outputs and returns a matplotlib Figure; ``save``
writes it as PNG and SVG under ``reports/<experiment>/figures/<name>`` (stable names, for
papers and slides). Notebooks call these and display the figure; ``aloe report``
redraws them from the files without rerunning anything.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd


def figures_dir(experiment: str, reports_root: str | Path = "reports") -> Path:
    return Path(reports_root) / experiment / "figures"


def save(fig, experiment: str, name: str, reports_root: str | Path = "reports") -> Path:
    """Write ``fig`` as <name>.png and <name>.svg; returns the PNG's path."""
    out = figures_dir(experiment, reports_root)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    return out / f"{name}.png"


def growth(rounds: pd.DataFrame):
    """Pool size and acceptance rate per growth round, by kind."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for kind, g in rounds.groupby("kind"):
        axes[0].plot(g["round"], g["pool_size"], marker="o", label=kind)
        axes[1].plot(g["round"], g["accepted"] / g["candidates"].clip(lower=1), marker="o", label=kind)
    axes[0].set(xlabel="round", ylabel="pool size", title="Pool size per round")
    axes[1].set(xlabel="round", ylabel="accepted / candidates", title="Acceptance rate per round", ylim=(0, 1))
    for ax in axes:
        ax.legend()
        ax.set_xticks(sorted(rounds["round"].unique()))
    return fig


def nearest_similarity(pool: pd.DataFrame, threshold: float):
    fig, ax = plt.subplots(figsize=(6, 3))
    pool["nearest_sim"].dropna().plot.hist(bins=20, ax=ax)
    ax.axvline(threshold, color="red", label=f"threshold {threshold}")
    ax.set(xlabel="cosine similarity to nearest earlier item", title="Nearest-neighbour similarity")
    ax.legend()
    return fig


def tree_disclosure(curve: pd.DataFrame):
    """Revealed and recovered shares of the persona by turn, in the trees."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve.plot(marker="o", ylim=(0, 1), ax=ax)
    ax.set(xlabel="turn k", ylabel="share of persona facts", title="Disclosure by turn (trees)")
    ax.set_xticks(curve.index)
    return fig


def training_curves(hist: pd.DataFrame):
    """Loss, and for DPO the reward margin and accuracy, by step and variant."""
    metrics = [m for m in ("loss", "rewards/margins", "rewards/accuracies") if (hist.metric == m).any()]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for variant, g in hist[hist.metric == m].groupby("variant"):
            ax.plot(g["step"], g["value"], marker="o", label=variant)
        ax.set(xlabel="step", title=m)
        ax.legend()
    return fig


def al_curves(metrics: dict):
    """AL(k) per model with its 95% band over personas."""
    from aloe.reporting.summary import al_frame

    al = al_frame(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, g in al.groupby("model", sort=False):
        ax.plot(g.turn, g.al, marker="o", label=model)
        ax.fill_between(g.turn, g.ci_low, g.ci_high, alpha=0.15)
    ax.set(
        xlabel="turn k",
        ylabel=f"AL(k), judge: {metrics.get('judge')}",
        title=f"ALOE alignment level, {metrics['personas']} personas",
    )
    ax.set_xticks(sorted(al.turn.unique()))
    ax.legend()
    return fig


def eval_disclosure(metrics: dict):
    """Share of the persona the simulated user has revealed by turn, per model."""
    from aloe.reporting.summary import disclosure_frame

    disc = disclosure_frame(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(disc):
        disc.pivot(index="turn", columns="model", values="revealed").plot(marker="o", ylim=(0, 1), ax=ax)
        ax.set_xticks(sorted(disc.turn.unique()))
    ax.set(xlabel="turn k", ylabel="share of persona facts revealed", title="Disclosure by turn (evaluation)")
    return fig


def publish(fig, experiment: str, name: str) -> Path:
    """Save ``fig`` under reports/<experiment>/figures/ and show it once in the notebook."""
    path = save(fig, experiment, name)
    try:
        from IPython.display import display

        display(fig)
    finally:
        plt.close(fig)
    return path
