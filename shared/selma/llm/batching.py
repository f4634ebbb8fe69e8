"""One decode loop per local causal LM, shared by every job that calls it: a continuous-batching queue.

Jobs (prompt generation, evaluation's question generation) submit their rounds of requests to the
model's :class:`BatchingQueue`; one worker thread decodes whatever is waiting together, up to
``max_batch`` rows, admitting new requests between decode steps (their prefill runs as one packed
forward, then they join the decode batch) and retiring rows as they finish.  A cancelled group's
rows leave the batch at the next step; the other groups go on.

**A row's tokens do not depend on its companions.**  Two things make ``generate`` on a padded
batch companion-dependent, and both are removed here:

* *sampling*: Hugging Face draws every row from torch's one global RNG.  Here every request has its
  own ``torch.Generator`` seeded with the request's seed, and sampling (temperature, top-k, top-p,
  multinomial) runs on the row's own logits.
* *numerics*: measured on CPU fp32 (torch 2.13, MKL), a row of ``x @ W.T`` is bitwise the same for
  any companions and any position **when the number of rows is a multiple of 4** (1, 2-3 and >= 4
  rows give three different results with one thread; with 2-8 threads a non-multiple of 4 also
  differs by position), and attention over a left-padded batch differs with the padding length.
  So every forward is one *packed* sequence whose token count is padded to a multiple of 4 (dummy
  tokens), and attention runs per row on that row's own keys (its own KV cache, no padding), with
  the same shapes as when the row runs alone.  Embedding, norms, rotary and MLP are per token.

The guarantee, checked by tests on the tiny LM and on SmolLM2: a request gives the same tokens
alone or batched with any other requests, on the same machine, dtype and thread count.
Different hardware or BLAS builds may differ in the last bits, as any float computation does.
The multiple-of-4 rule is a property of this CPU's BLAS; on a GPU (cuBLAS picks kernels by the
total packed token count) it is not guaranteed, so there a job's text may depend on which other
jobs' rows shared its steps: deterministic for a job run alone, not across different companions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from selma.errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted
from selma.llm import metrics

log = logging.getLogger(__name__)

ATTENTION_NAME = "selma_packed_rows"
ROW_MULTIPLE = 4  # rows per matmul: see the module docstring
_registered = threading.Lock()
_is_registered = False


@dataclass(frozen=True)
class DecodeRequest:
    """One sequence to continue: its prompt tokens and how to sample."""

    input_ids: tuple[int, ...]
    seed: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()


@dataclass
class DecodeResult:
    """The generated tokens (the eos token included when one ended the row) and why the row ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"


class _Group:
    """The requests of one ``submit`` call: finished together, cancelled together."""

    def __init__(self, n: int) -> None:
        self.results: list[DecodeResult | None] = [None] * n
        self.left = n
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _Row:
    """A request being decoded: its own generator and KV cache (one buffer per layer, grown by doubling)."""

    def __init__(self, req: DecodeRequest, group: _Group, slot: int, n_layers: int) -> None:
        import torch

        self.req = req
        self.group = group
        self.slot = slot
        self.generator = torch.Generator().manual_seed(req.seed)
        self.tokens: list[int] = []
        self.length = 0  # tokens in the KV cache
        self.keys: list[Any] = [None] * n_layers
        self.values: list[Any] = [None] * n_layers
        self.finish_reason = ""

    def append(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Add this step's keys/values (1, heads, n, dim) to the layer's cache; returns the cache so far."""
        import torch

        n = k.shape[2]
        end = self.length + n
        buf = self.keys[layer]
        if buf is None or buf.shape[2] < end:
            # Capacity depends on this row alone (its prompt and max_new_tokens), never on companions.
            cap = max(end, min(self.length + self.req.max_new_tokens + n, 2 * end if buf is not None else end + 64))
            new_k = torch.empty((1, k.shape[1], cap, k.shape[3]), dtype=k.dtype, device=k.device)
            new_v = torch.empty_like(new_k)
            if buf is not None:
                new_k[:, :, : self.length] = buf[:, :, : self.length]
                new_v[:, :, : self.length] = self.values[layer][:, :, : self.length]
            self.keys[layer], self.values[layer] = new_k, new_v
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass
class _Pack:
    """What one packed forward holds: (row, start, n new tokens) per segment."""

    segments: list[tuple[_Row, int, int]] = field(default_factory=list)
    calls: int = 0  # attention layers that ran through _packed_attention


def _packed_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                      dropout: float = 0.0, selma_pack: _Pack | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Attention of a packed sequence, row by row on each row's own KV cache (registered with transformers)."""
    import torch.nn.functional as F

    if selma_pack is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention runs only inside selma's batching queue")
    layer = module.layer_idx
    selma_pack.calls += 1
    _, heads, total, dim = query.shape
    out = query.new_zeros((1, total, heads, dim))
    for row, start, n in selma_pack.segments:
        first = row.length == 0
        k, v = row.append(layer, key[:, :, start : start + n], value[:, :, start : start + n])
        q = query[:, :, start : start + n].contiguous()
        # Prefill attends causally within the prompt; a decode step (one query) attends to everything cached.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=first and n > 1, scale=scaling,
                                           enable_gqa=k.shape[1] != heads)
        out[0, start : start + n] = o[0].transpose(0, 1)
    return out, None


def _register() -> None:
    global _is_registered
    with _registered:
        if _is_registered:
            return
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _packed_attention)
        _is_registered = True


def _pad_to(n: int) -> int:
    return max(ROW_MULTIPLE, -(-n // ROW_MULTIPLE) * ROW_MULTIPLE)


class BatchingQueue:
    """Decodes every waiting request of one model together (see the module docstring).

    ``submit`` blocks until its requests are done (or raises Cancelled once ``cancel`` is set,
    leaving the others' rows running).  The worker thread starts on demand and ends when idle.
    """

    def __init__(self, model: Any, tokenizer: Any, device: Any, *, max_batch: int, max_wait: float,
                 tokenizer_lock: threading.Lock | None = None) -> None:
        _register()
        try:
            model.set_attn_implementation(ATTENTION_NAME)  # this queue is the model's only caller from now on
        except (ValueError, NotImplementedError) as e:
            raise FailedPrecondition(f"{type(model).__name__} cannot use selma's batched attention: {e}") from None
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.tokenizer_lock = tokenizer_lock or threading.Lock()  # a fast tokenizer is not thread-safe
        self._cv = threading.Condition()
        self._pending: deque[_Row] = deque()
        self._worker: threading.Thread | None = None
        self._n_layers = int(getattr(model.config, "num_hidden_layers", 0) or model.config.n_layer)
        self.steps = 0  # decode forwards run (for tests and logs)
        self.max_rows_seen = 0  # the largest decode batch so far

    def submit(self, requests: Sequence[DecodeRequest], *, cancel: Any = None, poll: float = 0.05) -> list[DecodeResult]:
        """Decode ``requests`` (in any company) and return their results in order."""
        if not requests:
            return []
        for r in requests:
            if not r.input_ids or r.max_new_tokens < 1:
                raise InvalidArgument(f"a request to decode needs at least one prompt token and max_new_tokens >= 1; got "
                                      f"{len(r.input_ids)} tokens and max_new_tokens {r.max_new_tokens}", field="max_tokens")
        group = _Group(len(requests))
        rows = [_Row(r, group, i, self._n_layers) for i, r in enumerate(requests)]
        with self._cv:
            self._pending.extend(rows)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="llm-batching", daemon=True)
                self._worker.start()
            self._cv.notify_all()
        while not group.done.wait(poll):
            if cancel is not None and cancel.is_set():
                group.cancelled = True  # the worker drops its rows at the next step
                with self._cv:
                    self._cv.notify_all()
                raise Cancelled("LLM generation was cancelled")
            with self._cv:
                if (self._worker is None or not self._worker.is_alive()) and not group.done.is_set():
                    raise RuntimeError("the LLM batching worker stopped without finishing this request")
        if group.error is not None:
            raise group.error
        return [r for r in group.results if r is not None]

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Row] = []
        while True:
            with self._cv:
                if not active:
                    if not self._pending:
                        self._cv.wait(timeout=1.0)
                        if not self._pending:
                            self._worker = None
                            return
                    # A short wait lets requests submitted together (several jobs' rounds) share the prefill.
                    deadline = time.monotonic() + self.max_wait
                    while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(timeout=left)
                new: list[_Row] = []
                while self._pending and len(active) + len(new) < self.max_batch:
                    row = self._pending.popleft()
                    if not row.group.cancelled and not row.group.done.is_set():
                        new.append(row)
            active = [r for r in active if not r.group.cancelled and not r.group.done.is_set()]
            try:
                self._step(active, new)
                active = [r for r in active + new if not self._finish_if_done(r)]
            except BaseException as e:  # noqa: BLE001 - every waiting caller gets the error, the worker goes on
                err = self._translate(e, len(active) + len(new))
                for r in active + new:
                    r.group.fail(err)
                active = []

    def _translate(self, e: BaseException, n: int) -> BaseException:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return ResourceExhausted(f"out of memory decoding {n} sequences at once; lower llm_local_max_batch or max_tokens")
        if isinstance(e, FailedPrecondition):
            return e
        log.exception("the batched decode failed")
        return e

    def _step(self, active: list[_Row], new: list[_Row]) -> None:
        """One packed forward: the prompts of ``new`` rows and one token of every ``active`` row."""
        import torch

        if not active and not new:
            return
        ids: list[int] = []
        pos: list[int] = []
        last: list[int] = []
        pack = _Pack()
        for r in new:
            pack.segments.append((r, len(ids), len(r.req.input_ids)))
            ids.extend(r.req.input_ids)
            pos.extend(range(len(r.req.input_ids)))
            last.append(len(ids) - 1)
        for r in active:
            pack.segments.append((r, len(ids), 1))
            ids.append(r.tokens[-1])
            pos.append(r.length)
            last.append(len(ids) - 1)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n_real = len(ids)
        ids += [pad] * (_pad_to(n_real) - n_real)
        pos += [0] * (len(ids) - n_real)
        last += [last[-1]] * (_pad_to(len(last)) - len(last))
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=self.device)
            position_ids = torch.tensor([pos], device=self.device)
            # The all-ones mask only quiets a padding warning: the packed attention ignores masks.
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids,
                                           use_cache=False, selma_pack=pack).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[0, torch.tensor(last, device=self.device)]).float()
        if pack.calls == 0:
            raise FailedPrecondition(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface, so selma "
                "cannot batch it; use an architecture that does (Llama, Qwen2, GPT-2, ...) or the openai_compatible backend")
        self.steps += 1
        metrics.LLM_BATCH_ROWS.observe(len(pack.segments))
        self.max_rows_seen = max(self.max_rows_seen, len(active) + len(new))
        for i, (r, _, n) in enumerate(pack.segments):
            r.length += n
            r.tokens.append(_sample(logits[i], r))

    def _finish_if_done(self, r: _Row) -> bool:
        req = r.req
        tok = r.tokens[-1]
        if tok in req.eos_ids:
            reason = "stop"
        elif req.stop and self._has_stop(r):
            reason = "stop"
        elif len(r.tokens) >= req.max_new_tokens:
            reason = "length"
        else:
            return False
        g = r.group
        g.results[r.slot] = DecodeResult(tokens=r.tokens, finish_reason=reason)
        r.keys = r.values = []  # free the cache now
        g.left -= 1
        if g.left == 0:
            g.done.set()
        return True

    def _has_stop(self, r: _Row) -> bool:
        with self.tokenizer_lock:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        return any(s in text for s in r.req.stop)


def _sample(logits: Any, row: _Row) -> int:
    """The next token of one row from its own logits and generator (greedy at temperature 0)."""
    import torch

    req = row.req
    if req.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / req.temperature
    if req.top_k and req.top_k < scores.shape[-1]:
        kth = torch.topk(scores, req.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= req.top_p  # the smallest set whose mass reaches top_p is kept (never empty)
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


__all__ = ["ATTENTION_NAME", "BatchingQueue", "DecodeRequest", "DecodeResult"]
