"""Two parts of the transformers backend that the tree engine leans on, on and off.

    .venv/bin/python scripts/bench_engine_parts.py [--personas 16]

Runs one lockstep turn of tree synthesis (the default run's tree settings) with the
call cache off, keeps the requests each role sent, then times, on exactly those requests:

* judge scoring with shared prefixes encoded once vs every prompt encoded whole
  (``share_prefix``), with the prompt tokens each way and the largest score difference;
* responder generation with this backend's inverse-CDF sampler vs ``generate``'s own
  ``do_sample=True`` (``torch.multinomial``), same batch, same settings.

Each pair is timed alternately, best of --repeats. Writes data/bench/bench_engine_parts.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_trees import run_trees, tree_settings  # scripts/ is on sys.path when run as a script

from aloe.backends import open_backend
from aloe.backends.transformers_backend import prefix_groups
from aloe.config import BackendConfig
from aloe.io import write_json


class Recorder:
    def __init__(self, inner):
        self.inner, self.cache, self.sent = inner, inner.cache, {}

    def chat(self, requests):
        self.sent.setdefault(requests[0].prompt_version, list(requests))
        return self.inner.chat(requests)

    def logprobs(self, requests):
        self.sent.setdefault(requests[0].prompt_version, list(requests))
        return self.inner.logprobs(requests)

    def describe(self):
        return self.inner.describe()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


def with_attr(fn, obj, name, value):
    """fn, run with obj.name set to value for the call (restored afterwards)."""

    def run():
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            return fn()
        finally:
            setattr(obj, name, old)

    return run


def alternate(a, b, repeats):
    """Best of `repeats` timings of each, run alternately (a, b, a, b, ...): runs on a
    shared 2-core machine vary by 10-15%, so one timing each can mislead."""
    ta, tb = [], []
    for _ in range(repeats):
        out_a, t = timed(a)
        ta.append(t)
        out_b, t = timed(b)
        tb.append(t)
    return out_a, min(ta), out_b, min(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="parameters/default.yaml")
    ap.add_argument("--personas", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    settings, batch_size = tree_settings(args.params)
    backend = open_backend(BackendConfig(kind="transformers", model="smollm2-135m", batch_size=batch_size), None)
    rec = Recorder(backend)
    run_trees(rec, settings, args.personas, turns=1)
    judge_reqs = [r for v, reqs in rec.sent.items() if v.startswith("judge_") for r in reqs]
    seqs = [backend._prompt_ids(r.messages) for r in judge_reqs]
    groups = prefix_groups(seqs, backend.min_shared_prefix, backend.batch_size)
    tokens = sum(map(len, seqs))
    shared_tokens = tokens - sum((len(m) - 1) * n for n, m in groups)

    def score():
        return backend._score(judge_reqs)

    shared, t_shared, whole, t_whole = alternate(score, with_attr(score, backend, "share_prefix", False), args.repeats)
    diff = max(abs(a.logprobs[c] - b.logprobs[c]) for r, a, b in zip(judge_reqs, shared, whole) for c in r.candidates)

    responders = rec.sent[[v for v in rec.sent if v.startswith("responder_")][0]]

    def multinomial_batch(seqs, temperature, top_p, max_tokens, seed):
        ids, mask = backend._pad_left(seqs)
        torch.manual_seed(seed % (2**63))
        with torch.inference_mode():
            backend.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=None,
                pad_token_id=backend.tokenizer.pad_token_id,
            )
        return [None] * len(seqs)

    def generate():
        return backend._generate(responders)

    _, t_inverse, _, t_multinomial = alternate(
        generate, with_attr(generate, backend, "_generate_batch", multinomial_batch), args.repeats
    )
    report = {
        "timing": f"best of {args.repeats}, alternating",
        "args": vars(args),
        "trees_settings": settings,
        "batch_size": backend.batch_size,
        "judge": {
            "prompts": len(judge_reqs),
            "tokens_whole": tokens,
            "tokens_shared": shared_tokens,
            "seconds_whole": t_whole,
            "seconds_shared": t_shared,
            "max_abs_logprob_difference": round(diff, 4),
        },
        "responders": {
            "requests": len(responders),
            "seconds_inverse_cdf": t_inverse,
            "seconds_multinomial": t_multinomial,
        },
    }
    print(
        f"judge: {len(judge_reqs)} prompts, {tokens} -> {shared_tokens} tokens encoded; "
        f"{t_whole} s whole vs {t_shared} s shared (max |logprob difference| {diff:.3f}, bf16)"
    )
    print(
        f"responders: {len(responders)} requests; sampling by inverse CDF {t_inverse} s vs "
        f"torch.multinomial {t_multinomial} s"
    )
    write_json(Path("data/bench/bench_engine_parts.json"), report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
