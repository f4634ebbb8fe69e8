"""The SELMA prompt loop: sample in-context examples from a growing pool, ask the LLM, filter, repeat.

Per LLM request (SELMA §1): take ``examples_per_request`` prompts at random from the pool
(seeds ∪ accepted prompts), render them with the skill's rules as a numbered list, let the LLM
continue it, parse the continuation, and judge each candidate in order:

1. longer than the service maximum → TOO_LONG;
2. no ROUGE tokens (nothing but punctuation, or empty) → EMPTY (a response yielding no
   candidate at all also counts one EMPTY);
3. ROUGE-L F against some pool prompt above the threshold, or a token-for-token repeat of a
   pool prompt (even at threshold 1.0) → ROUGE_L; a candidate that merely restates one of the
   skill's rules is rejected the same way;
4. with the embedding filter, cosine similarity above its threshold → EMBEDDING;
5. otherwise accepted, and it joins the pool at once (later candidates of the same response
   are compared with it).

The loop stops at ``count`` accepted prompts (exactly; SELMA's script overshoots) or when the
request budget is spent.

Determinism: request ``i`` samples its examples with ``random.Random(f"{seed}:{i}")`` from the
pool as it stands, and sends the backend a seed derived from ``(seed, i)``.  Requests go out
in rounds of the backend's concurrency or batch size, or fewer when fewer prompts are still
missing (one request per missing prompt), all sampled before the round is sent and
processed in request order, so a deterministic LLM gives the same prompt set on every run
— and on a run resumed from a state saved between rounds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selma.errors import InvalidArgument, PermissionDenied
from selma.llm import metrics as llm_metrics
from selma.llm.backend import LlmBackend, LlmRequest, LlmUnavailable, request_seed
from selma.llm.embedding import EmbeddingPool
from selma_prompts import metrics
from selma_prompts.parser import parse_numbered_list
from selma_prompts.rouge import RougeLPool
from selma_prompts.spec import GenerationSpec
from selma_prompts.templates import build_request

log = logging.getLogger(__name__)

REJECTION_REASONS = ("rouge_l", "embedding", "empty", "too_long")
STOP_TARGET = "target_reached"
STOP_BUDGET = "request_budget_exhausted"
STOP_LLM_FAILED = "llm_failed"
STOP_CANCELLED = "cancelled"


def prompt_id(index: int) -> str:
    """Stable id of the accepted prompt at ``index`` (the artifact contract: ``p000000``)."""
    return f"p{index:06d}"


def seed_id(index: int) -> str:
    return f"seed-{index}"


@dataclass
class GenerationState:
    """Everything a job must persist to resume: accepted records, the next request number, counters."""

    records: list[dict[str, Any]] = field(default_factory=list)
    next_request: int = 1
    llm_requests: int = 0
    llm_errors: int = 0
    llm_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECTION_REASONS, 0))
    filter_seconds: float = 0.0
    stop_reason: str = ""

    def counters(self) -> dict[str, Any]:
        """The counters (everything but the records), JSON-able."""
        return {
            "next_request": self.next_request,
            "llm_requests": self.llm_requests,
            "llm_errors": self.llm_errors,
            "llm_retries": self.llm_retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rejections": dict(self.rejections),
            "filter_seconds": self.filter_seconds,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_parts(cls, counters: dict[str, Any], records: list[dict[str, Any]]) -> GenerationState:
        rejections = dict.fromkeys(REJECTION_REASONS, 0)
        rejections.update(counters.get("rejections") or {})
        return cls(
            records=records,
            next_request=int(counters.get("next_request", 1)),
            llm_requests=int(counters.get("llm_requests", 0)),
            llm_errors=int(counters.get("llm_errors", 0)),
            llm_retries=int(counters.get("llm_retries", 0)),
            prompt_tokens=int(counters.get("prompt_tokens", 0)),
            completion_tokens=int(counters.get("completion_tokens", 0)),
            rejections=rejections,
            filter_seconds=float(counters.get("filter_seconds", 0.0)),
            stop_reason=str(counters.get("stop_reason", "")),
        )

    @property
    def rejected(self) -> int:
        return sum(self.rejections.values())


@dataclass
class RoundReport:
    """What one round did, for progress reporting."""

    requests: list[int]
    accepted: int
    rejected: int


class PromptGenerator:
    """Runs the loop for one spec against one backend, from a fresh or restored state."""

    def __init__(
        self,
        spec: GenerationSpec,
        backend: LlmBackend,
        *,
        state: GenerationState | None = None,
        embedder: EmbeddingPool | None = None,
        max_prompt_chars: int = 1000,
        on_round: Callable[[GenerationState, RoundReport], None] | None = None,
        check_cancelled: Callable[[], None] | None = None,
        cancel_event: threading.Event | None = None,
        rejected_sink: list[dict[str, Any]] | None = None,
        max_rejected: int = 200,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.state = state or GenerationState()
        self.embedder = embedder
        self.max_prompt_chars = max_prompt_chars
        self.on_round = on_round
        self.check_cancelled = check_cancelled or (lambda: None)
        self.cancel_event = cancel_event
        self.rejected_sink = rejected_sink
        self.max_rejected = max_rejected
        skill = spec.skill
        self.pool_ids: list[str] = [seed_id(i) for i in range(len(skill.seed_examples))]
        self.pool_texts: list[str] = list(skill.seed_examples)
        for rec in self.state.records:
            self.pool_ids.append(rec["id"])
            self.pool_texts.append(rec["text"])
        self.rouge = RougeLPool()
        self._exact: dict[str, int] = {}
        for t in self.pool_texts:
            enc = self.rouge.encode(t)
            self._exact.setdefault(enc, len(self.rouge))
            self.rouge.add(t, enc)
        self.rules = RougeLPool(skill.rules)
        if self.embedder is not None and len(self.embedder) == 0:
            self.embedder.add(self.embedder.embed(self.pool_texts))
        self._labels = {"skill": skill.name}

    @property
    def accepted(self) -> int:
        return len(self.state.records)

    def _requests(self, n: int) -> list[LlmRequest]:
        out = []
        k = min(self.spec.examples_per_request, len(self.pool_texts))
        for j in range(n):
            index = self.state.next_request + j
            rng = random.Random(f"selma-prompts:{self.spec.seed}:{index}")
            picks = rng.sample(range(len(self.pool_texts)), k)
            out.append(
                build_request(
                    index,
                    request_seed(self.spec.seed, index),
                    self.spec.skill,
                    [self.pool_ids[i] for i in picks],
                    [self.pool_texts[i] for i in picks],
                    self.spec.prompts_per_request,
                )
            )
        return out

    def run(self) -> GenerationState:
        """Generate until ``count`` prompts are accepted or the budget is spent; returns the state.

        Raises LlmUnavailable (state.stop_reason = llm_failed) when the LLM keeps failing, and
        whatever ``check_cancelled`` raises; the state is consistent at every raise.
        """
        st = self.state
        budget = self.spec.budget
        while self.accepted < self.spec.count:
            made = st.next_request - 1
            if made >= budget:
                st.stop_reason = STOP_BUDGET
                return st
            self.check_cancelled()
            # Ask only for what is still missing: a request yields up to prompts_per_request candidates,
            # but many are rejected, so one request per missing prompt (never more than a round).
            reqs = self._requests(min(self.backend.round_size, budget - made, self.spec.count - self.accepted))
            try:
                responses = self.backend.generate(reqs, cancel=self.cancel_event)
            except (LlmUnavailable, PermissionDenied, InvalidArgument) as e:
                # The endpoint failed or refused us: the round is dropped whole (it is redone on resume).
                st.llm_errors += 1
                st.llm_retries += int(getattr(e, "retries", 0))
                st.stop_reason = STOP_LLM_FAILED
                llm_metrics.LLM_REQUESTS.labels(self.backend.kind, "error").inc()
                raise
            before_acc, before_rej = self.accepted, st.rejected
            for req, resp in zip(reqs, responses, strict=True):
                llm_metrics.LLM_REQUESTS.labels(self.backend.kind, "ok").inc()
                st.llm_requests += 1
                st.llm_retries += resp.retries
                st.prompt_tokens += resp.prompt_tokens
                st.completion_tokens += resp.completion_tokens
                if self.accepted < self.spec.count:
                    self._judge_response(req, resp.text, resp.starts_mid_item, resp.finish_reason == "length")
            st.next_request += len(reqs)
            if self.on_round is not None:
                self.on_round(st, RoundReport([r.index for r in reqs], self.accepted - before_acc, st.rejected - before_rej))
        st.stop_reason = STOP_TARGET
        return st

    def _reject(self, reason: str, text: str, req: LlmRequest, nearest: str = "", score: float = 0.0) -> None:
        self.state.rejections[reason] += 1
        metrics.PROMPTS_REJECTED.labels(self.spec.skill.name, reason).inc()
        sink = self.rejected_sink
        if sink is not None and len(sink) < self.max_rejected:
            sink.append({"text": text, "reason": reason, "nearest_prompt_id": nearest, "score": score, "llm_request_index": req.index})

    def _judge_response(self, req: LlmRequest, text: str, starts_mid_item: bool, truncated: bool) -> None:
        parsed = parse_numbered_list(text, starts_mid_item=starts_mid_item, truncated=truncated, first_number=req.first_number)
        for _ in range(parsed.empty_items + (0 if parsed.items else 1)):
            self._reject("empty", "", req)
        vectors = None
        if self.embedder is not None and parsed.items:
            t0 = time.perf_counter()
            vectors = self.embedder.embed(parsed.items)
            dt = time.perf_counter() - t0
            self.state.filter_seconds += dt
            metrics.FILTER_SECONDS.labels("embedding").observe(dt)
        t_rouge = 0.0
        for j, cand in enumerate(parsed.items):
            if self.accepted >= self.spec.count:
                break
            if len(cand) > self.max_prompt_chars:
                self._reject("too_long", cand, req)
                continue
            t0 = time.perf_counter()
            enc = self.rouge.encode(cand)
            if not enc:
                t_rouge += time.perf_counter() - t0
                self._reject("empty", cand, req)
                continue
            dup = self._exact.get(enc)
            if dup is not None:
                best_i, best_f = dup, 1.0
            else:
                best_i, best_f = self.rouge.best(cand, enc)
            rule_i, rule_f = self.rules.best(cand)
            t_rouge += time.perf_counter() - t0
            if dup is not None or best_f > self.spec.threshold:
                self._reject("rouge_l", cand, req, self.pool_ids[best_i], best_f)
                continue
            if rule_f > self.spec.threshold:
                self._reject("rouge_l", cand, req, f"rule-{rule_i + 1}", rule_f)
                continue
            cos: float | None = None
            if vectors is not None and self.embedder is not None:
                t1 = time.perf_counter()
                emb_i, cos = self.embedder.best(vectors[j])
                self.state.filter_seconds += time.perf_counter() - t1
                if cos > self.spec.embedding.max_cosine_similarity:  # type: ignore[union-attr]
                    self._reject("embedding", cand, req, self.pool_ids[emb_i], cos)
                    continue
            self._accept(cand, enc, req, best_i, best_f, cos)
            if vectors is not None and self.embedder is not None:
                self.embedder.add(vectors[j : j + 1])
        self.state.filter_seconds += t_rouge
        metrics.FILTER_SECONDS.labels("rouge_l").observe(t_rouge)

    def _accept(self, text: str, enc: str, req: LlmRequest, nearest: int, score: float, cos: float | None) -> None:
        index = self.accepted
        rec: dict[str, Any] = {
            "id": prompt_id(index),
            "index": index,
            "text": text,
            "skill": self.spec.skill.name,
            "in_context_example_ids": list(req.example_ids),
            "nearest_prompt_id": self.pool_ids[nearest],
            "nearest_rouge_l": score,
            "llm_request_index": req.index,
            "backend_model": self.backend.backend_model,
        }
        if cos is not None:
            rec["nearest_cosine_similarity"] = cos
        self.state.records.append(rec)
        self.pool_ids.append(rec["id"])
        self.pool_texts.append(text)
        self._exact.setdefault(enc, len(self.rouge))
        self.rouge.add(text, enc)
        metrics.PROMPTS_ACCEPTED.labels(self.spec.skill.name).inc()
