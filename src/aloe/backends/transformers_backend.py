"""Local backend on Hugging Face transformers.

Batched generation with left padding; only the new tokens are decoded. On a CPU
with native bf16 support, ``dtype: auto`` loads bf16 weights (measured here faster
than fp32 and than fp32 under autocast; see scripts/bench_backend.py). Requests are grouped
by sampling parameters (one ``generate`` call takes one setting) and sorted by
length inside a group so that batches waste little padding; results come back in
request order.

Seeds: greedy decoding is deterministic. With temperature > 0 each batch is seeded
from its requests' seeds, so the same batch reproduces exactly; the call cache makes
reruns exact regardless of batching.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch

from aloe.backends.base import CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest
from aloe.cache import CallCache

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds without the op
        return False


class TransformersBackend(ChatBackend):
    kind = "transformers"

    def __init__(self, location: str, model_id: str, revision: str, cache: CallCache | None = None,
                 batch_size: int = 8, dtype: str = "auto", device: str = "auto", hf_revision: str | None = None,
                 model=None, tokenizer=None):
        super().__init__(model_id, revision, cache)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.batch_size = batch_size
        load_dtype = torch.float32
        self.autocast_dtype = None
        if dtype == "auto":
            # bf16 weights where the CPU has native bf16 units (measured here: faster than
            # fp32 and than fp32 weights under autocast, which re-casts every matmul).
            if self.device == "cuda" or cpu_supports_bf16():
                load_dtype = torch.bfloat16
        elif dtype in ("bfloat16", "float16"):
            load_dtype = getattr(torch, dtype)
        elif dtype == "autocast-bf16":
            self.autocast_dtype = torch.bfloat16  # weights stay fp32; matmuls in bf16
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(location, revision=hf_revision)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model or AutoModelForCausalLM.from_pretrained(
            location, dtype=load_dtype, revision=hf_revision)
        self.model.to(self.device).eval()
        self.dtype_used = str(self.autocast_dtype or load_dtype).replace("torch.", "")

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "compute_dtype": self.dtype_used}

    def _autocast(self):
        if self.autocast_dtype is not None:
            return torch.autocast("cpu", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _prompt_ids(self, messages) -> list[int]:
        enc = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding; older versions a plain list
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def _pad_left(self, seqs: list[list[int]]):
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    @torch.inference_mode()
    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            s = r.sampling
            groups[(s.temperature, s.top_p, s.max_tokens)].append(i)
        prompts = [self._prompt_ids(r.messages) for r in requests]
        for (temperature, top_p, max_tokens), idx in groups.items():
            idx.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                try:
                    texts = self._generate_batch([prompts[i] for i in chunk], temperature, top_p, max_tokens,
                                                 seed=sum(requests[i].sampling.seed * 1_000_003 + requests[i].sample_index
                                                          for i in chunk))
                    for i, t in zip(chunk, texts):
                        out[i] = t
                except (RuntimeError, ValueError) as e:  # e.g. out of memory on one batch
                    log.error("generation failed for a batch of %d: %s", len(chunk), e)
                    for i in chunk:
                        out[i] = Completion(text=None, error=f"{type(e).__name__}: {e}")
        return out  # type: ignore[return-value]

    def _generate_batch(self, seqs, temperature, top_p, max_tokens, seed) -> list[Completion]:
        ids, mask = self._pad_left(seqs)
        do_sample = temperature > 0
        if do_sample:
            torch.manual_seed(seed % (2**63))
        with self._autocast():
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                top_k=None, pad_token_id=self.tokenizer.pad_token_id,
            )
        new = gen[:, ids.shape[1]:]
        eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        results = []
        for row in new.tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t in eos_ids or t == self.tokenizer.pad_token_id:
                    n = j
                    break
            finish = "stop" if n < len(row) else "length"
            self.generated_tokens += n
            results.append(Completion(text=self.tokenizer.decode(row[:n], skip_special_tokens=True).strip(),
                                      finish_reason=finish, completion_tokens=n))
        return results

    @torch.inference_mode()
    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        """Exact log P(candidate | prompt) for every candidate, batched.

        A request whose candidates are all one token ("1".."5") costs one forward pass
        over its prompt; longer candidates get one pass each. Only the logits at the
        positions that predict candidate tokens are computed (``logits_to_keep``): the
        full [batch, length, vocabulary] tensor would dominate the cost on CPU.
        """
        # (request index, sequence, [(candidate, token ids)], sequence is the prompt only)
        items: list[tuple[int, list[int], list[tuple[str, list[int]]], bool]] = []
        for ri, r in enumerate(requests):
            p = self._prompt_ids(r.messages)
            cids = [(c, self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in r.candidates]
            if all(len(t) == 1 for _, t in cids):
                items.append((ri, p, cids, True))
            else:
                items += [(ri, p + t, [(c, t)], False) for c, t in cids]
        scores: dict[tuple[int, str], float] = {}
        order = sorted(range(len(items)), key=lambda k: len(items[k][1]))
        for start in range(0, len(order), self.batch_size):
            chunk = [items[k] for k in order[start:start + self.batch_size]]
            ids, mask = self._pad_left([it[1] for it in chunk])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(1 if prompt_only else len(cands[0][1]) + 1 for _, _, cands, prompt_only in chunk)
            with self._autocast():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                    logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # [batch, keep, vocabulary]
            for row, (ri, _, cands, prompt_only) in enumerate(chunk):
                if prompt_only:  # the prompt's last position predicts every one-token candidate
                    for c, t in cands:
                        scores[(ri, c)] = float(logp[row, -1, t[0]])
                else:  # positions -(n+1) .. -2 predict the candidate's n tokens
                    (c, t), n = cands[0], len(cands[0][1])
                    scores[(ri, c)] = float(sum(logp[row, -(n + 1) + j, t[j]] for j in range(n)))
        return [CandidateLogprobs({c: scores[(ri, c)] for c in r.candidates}, exact=True)
                for ri, r in enumerate(requests)]
