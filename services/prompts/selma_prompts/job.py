"""A prompt-generation job from spec to published prompt set, resumable at every step.

:class:`PromptJobRunner` is the job function the service's JobManager calls (and the CLI
calls directly).  One run:

1. validates the stored spec and, if the prompt set for this idempotency key is already
   published (an earlier attempt died after publishing), returns it;
2. restores the saved state (accepted prompts, counters, next request) if any;
3. runs the loop, saving the state after a round at most every ``prompts_checkpoint_seconds``
   and on every way out (LLM failure, cancel, shutdown, crash);
4. publishes ``prompts.jsonl`` as a ``prompt_set`` artifact whose id derives from the
   idempotency key (so a re-run lands on the same artifact), then drops the state.

Resume guarantees: the stored state is always the state after a complete round, so a
resumed job never duplicates a prompt and never loses a saved one; what a SIGKILL loses is at
most the rounds since the last save, and those are redone.  With a deterministic LLM
(temperature 0, or a server honouring ``seed``) the resumed job produces exactly the prompt
set an uninterrupted job would.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from selma.api import output_ref
from selma.artifacts import ArtifactKind, ArtifactStore, Manifest
from selma.errors import AlreadyExists, Cancelled, ResourceExhausted, SelmaError
from selma.jobs import Interrupted, JobContext, JobResult, spec_digest
from selma.llm.embedding import EmbeddingPool
from selma.llm.local import ModelRegistry
from selma.storage import Storage
from selma_prompts.generator import (
    STOP_BUDGET,
    STOP_CANCELLED,
    STOP_TARGET,
    GenerationState,
    PromptGenerator,
    RoundReport,
)
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import SkillLibrary, make_skill
from selma_prompts.spec import GenerationSpec, resolve_spec
from selma_prompts.state import StateStore

log = logging.getLogger(__name__)

JOB_KIND = "prompt_generation"
PROMPTS_FILE = "prompts.jsonl"


def job_stats(spec: GenerationSpec, state: GenerationState, backend_model: str) -> dict[str, Any]:
    """The job record's ``stats`` (the JSON form behind ``PromptGenerationStats``)."""
    return {
        "requested": spec.count,
        "accepted": len(state.records),
        "rejected": state.rejected,
        "rejections": dict(state.rejections),
        "llm_requests": state.llm_requests,
        "llm_request_budget": spec.budget,
        "llm_errors": state.llm_errors,
        "llm_retries": state.llm_retries,
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "filter_seconds": state.filter_seconds,
        "backend_model": backend_model,
        "stop_reason": state.stop_reason,
        "skill": spec.skill.to_dict(),
    }


def records_jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


class _CancelProbe:
    """An Event-like view of a job's cancellation, so LLM retry backoffs end early on cancel."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self._cancelled = cancelled

    def is_set(self) -> bool:
        return self._cancelled()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._cancelled():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.1))  # JobContext exposes a flag, not an event: poll it briefly
        return True


@dataclass
class RunOutcome:
    manifest: Manifest
    stats: dict[str, Any]
    message: str


class PromptJobRunner:
    """Runs prompt-generation jobs; shared by the service (as a JobManager job function) and the CLI."""

    def __init__(self, settings: PromptSettings, storage: Storage, registry: ModelRegistry, library: SkillLibrary) -> None:
        self.settings = settings
        self.storage = storage
        self.store = ArtifactStore(storage)
        self.registry = registry
        self.library = library

    def __call__(self, ctx: JobContext) -> JobResult:
        """JobManager entry point."""
        outcome = self.run(
            ctx.idempotency_key,
            ctx.spec,
            state_id=ctx.job_id,
            progress=lambda done, total, message, stats: ctx.progress(done, total, unit="prompts", message=message, stats=stats),
            update=lambda message, stats: ctx.update(message=message, stats=stats),
            check_cancelled=ctx.check_cancelled,
            cancelled=lambda: ctx.cancelled,
        )
        return JobResult(output=output_ref(outcome.manifest), stats=outcome.stats, message=outcome.message)

    def artifact_id(self, key: str) -> str:
        return self.store.new_id(ArtifactKind.PROMPT_SET, key)

    def run(
        self,
        key: str,
        spec_dict: dict[str, Any],
        *,
        state_id: str,
        progress: Callable[[int, int, str, dict[str, Any]], None] | None = None,
        update: Callable[[str | None, dict[str, Any]], None] | None = None,
        check_cancelled: Callable[[], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> RunOutcome:
        """Generate (or resume) and publish the prompt set for ``key``; see the module docstring."""
        progress = progress or (lambda *a: None)
        update = update or (lambda *a: None)
        spec = resolve_spec(spec_dict, self.settings, self.library)
        artifact_id = self.artifact_id(key)
        if self.store.exists(artifact_id):
            manifest = self.store.get(artifact_id)
            log.info("prompt set %s for key %r is already published", artifact_id, key)
            return RunOutcome(manifest, {}, f"prompt set {artifact_id} was already published")

        states = StateStore(self.storage, state_id)
        digest = spec_digest(spec_dict)
        loaded = states.load()
        state = None
        if loaded is not None:
            meta, state = loaded
            if meta.get("spec_digest") != digest:
                raise_mismatch(key)
            stored_skill = make_skill(meta["skill"])
            if stored_skill != spec.skill:
                log.warning("skill %r changed since the job started; resuming with the stored definition", spec.skill.name)
                spec = replace(spec, skill=stored_skill)
            log.info("resuming %s: %d prompts accepted, next request %d", state_id, len(state.records), state.next_request)
        meta = {"spec_digest": digest, "skill": spec.skill.to_dict(), "artifact_id": artifact_id}
        backend_model = spec.backend.backend_model

        if state is None or state.stop_reason not in (STOP_TARGET, STOP_BUDGET):
            state = self._generate(spec, state, states, meta, progress, update, check_cancelled, cancelled)
        stats = job_stats(spec, state, backend_model)
        update(None, stats)
        n = len(state.records)
        if n == 0:
            raise ResourceExhausted(
                f"no prompt was accepted in {state.llm_requests} LLM requests (rejections: {_reasons(state)}); the LLM's "
                "output was unusable or repeated the pool: use a stronger model, a higher temperature or a larger max_llm_requests"
            )
        update(f"publishing {n} prompts", stats)
        labels = {"selma.dev/skill": spec.skill.name, **dict(spec.labels)}
        if spec.run:
            labels["selma.dev/run"] = spec.run
        parameters = {**spec.parameters(), "count": n, "stop_reason": state.stop_reason}
        with self.store.writer(ArtifactKind.PROMPT_SET, id=artifact_id, parameters=parameters, labels=labels, name=f"{spec.skill.name} prompts") as w:
            w.put_bytes(PROMPTS_FILE, records_jsonl(state.records))
        manifest = self.store.get(artifact_id)
        states.delete()
        if state.stop_reason == STOP_BUDGET:
            message = (
                f"stopped: the budget of {spec.budget} LLM requests is spent with {n}/{spec.count} prompts accepted "
                f"(rejections: {_reasons(state)}); published {artifact_id}"
            )
        else:
            message = f"accepted {n} prompts in {state.llm_requests} LLM requests; published {artifact_id}"
        log.info("%s: %s", state_id, message)
        return RunOutcome(manifest, stats, message)

    def _generate(
        self,
        spec: GenerationSpec,
        state: GenerationState | None,
        states: StateStore,
        meta: dict[str, Any],
        progress: Callable[[int, int, str, dict[str, Any]], None],
        update: Callable[[str | None, dict[str, Any]], None],
        check_cancelled: Callable[[], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> GenerationState:
        state = state or GenerationState()
        state.stop_reason = ""
        backend_model = spec.backend.backend_model
        update(f"loading {backend_model}", job_stats(spec, state, backend_model))
        backend = self.registry.backend(spec.backend)
        embedder = None
        if spec.embedding is not None:
            model, lock = self.registry.embedding_model(spec.embedding.model_source, spec.embedding.device)
            embedder = EmbeddingPool(model, lock=lock)
        last_save = [time.monotonic()]
        interval = self.settings.prompts_checkpoint_seconds

        def on_round(st: GenerationState, report: RoundReport) -> None:
            now = time.monotonic()
            if interval == 0 or now - last_save[0] >= interval:
                states.save(st, meta)
                last_save[0] = now
            progress(
                len(st.records),
                spec.count,
                f"request {st.next_request - 1}/{spec.budget}: {len(st.records)}/{spec.count} prompts accepted",
                job_stats(spec, st, backend_model),
            )

        gen = PromptGenerator(
            spec,
            backend,
            state=state,
            embedder=embedder,
            max_prompt_chars=self.settings.prompts_max_prompt_chars,
            on_round=on_round,
            check_cancelled=check_cancelled,
            cancel_event=_CancelProbe(cancelled) if cancelled is not None else threading.Event(),  # type: ignore[arg-type]
        )
        progress(len(state.records), spec.count, f"generating with {backend_model}", job_stats(spec, state, backend_model))
        try:
            state = gen.run()
        except Cancelled:
            gen.state.stop_reason = STOP_CANCELLED
            states.save(gen.state, meta)
            update(None, job_stats(spec, gen.state, backend_model))
            raise
        except SelmaError:
            states.save(gen.state, meta)
            update(f"the LLM failed; {len(gen.state.records)} accepted prompts are kept for resume", job_stats(spec, gen.state, backend_model))
            raise
        except Interrupted:
            states.save(gen.state, meta)
            raise
        except BaseException:
            # Keep what was accepted even when something unexpected broke the loop.
            try:
                states.save(gen.state, meta)
            except Exception:  # noqa: BLE001 - the original error matters more
                log.exception("could not save the state of %s", states.prefix)
            raise
        finally:
            backend.close()
        states.save(state, meta)
        return state


def _reasons(state: GenerationState) -> str:
    parts = [f"{v} {k}" for k, v in state.rejections.items() if v]
    return ", ".join(parts) or "none"


def raise_mismatch(key: str) -> None:
    raise AlreadyExists(
        f"saved progress for key {key!r} belongs to a different spec; use a new idempotency key", field="idempotency_key"
    )


__all__ = ["JOB_KIND", "PROMPTS_FILE", "PromptJobRunner", "RunOutcome", "job_stats", "records_jsonl"]
