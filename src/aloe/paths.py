"""Every file a stage reads or writes under ``data/<experiment>/``, named in one place.

Stages meet through these files; none of them spells a file name of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path  # data/<experiment>

    def stage(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> Path:
        return self.root / stage / "manifest.json"

    # personas
    @property
    def pool(self) -> Path:
        return self.root / "personas" / "personas.jsonl"

    @property
    def pairs(self) -> Path:
        return self.root / "personas" / "pairs.jsonl"

    @property
    def growth(self) -> Path:
        return self.root / "personas" / "growth.json"

    @property
    def growth_rounds(self) -> Path:
        return self.root / "personas" / "rounds.jsonl"

    # trees
    @property
    def trees(self) -> Path:
        return self.root / "trees" / "trees.jsonl"

    @property
    def tree_steps(self) -> Path:
        """Each finished tree turn, appended as it happens when trees advance one by one (the
        scheduled path); folded into trees.jsonl when the stage finishes."""
        return self.root / "trees" / "trees.steps.jsonl"

    def export(self, name: str) -> Path:
        """A TRL export: sft_preferred, sft_rejected or dpo (aloe.variants.EXPORTS)."""
        return self.root / "trees" / f"{name}.jsonl"

    @property
    def sample_tree(self) -> Path:
        return self.root / "trees" / "sample_tree.html"

    # train
    def variant(self, variant: str) -> Path:
        return self.root / "train" / variant

    def checkpoints(self, variant: str) -> Path:
        return self.variant(variant) / "checkpoints"

    def adapter(self, variant: str) -> Path:
        return self.variant(variant) / "adapter"

    def merged(self, variant: str) -> Path:
        """The plain model folder (adapters folded in) that evaluation loads."""
        return self.variant(variant) / "merged"

    def train_metrics(self, variant: str) -> Path:
        return self.variant(variant) / "metrics.json"

    def train_done(self, variant: str) -> Path:
        return self.variant(variant) / "done.json"

    # evaluate
    def conversations(self, model: str, repeat: int = 0) -> Path:
        """One model's conversations; repeats after the first (other simulator seeds) beside them."""
        name = f"{model}.jsonl" if repeat == 0 else f"{model}.r{repeat}.jsonl"
        return self.root / "evaluate" / "conversations" / name

    @property
    def transcripts(self) -> Path:
        return self.root / "evaluate" / "transcripts.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "evaluate" / "scores.csv"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "evaluate" / "metrics.json"

    @property
    def judge_card(self) -> Path:
        return self.root / "evaluate" / "judge_card.json"


def stage_inputs(stage: str, cfg) -> list[tuple[str, Path]]:
    """The data files ``stage`` reads, each with the stage that writes it: checked before the stage
    spends anything (aloe.lock.stage) and before a run starts its first notebook (aloe.runner)."""
    from aloe.variants import BASELINES, VARIANTS, needed

    p: Paths = cfg.paths
    if stage == "personas":
        return [("personas", p.growth), ("personas", p.growth_rounds)]
    if stage == "trees":
        return [("personas", p.pairs), ("trees", p.trees), ("trees", p.tree_steps)]
    if stage == "train":
        variants = needed(cfg.variants)
        return [("trees", p.export(VARIANTS[v].data)) for v in variants] + [
            ("train", f(v)) for v in variants for f in (p.train_done, p.train_metrics)
        ]
    if stage == "evaluate":
        files = [("personas", p.pairs)] + ([("trees", p.trees)] if cfg.judge_card.enabled else [])
        files += [("evaluate", p.conversations(m, r)) for m in cfg.models for r in range(cfg.repeats)]
        return files + [("train", p.train_metrics(m)) for m in cfg.models if m not in BASELINES]
    return []
