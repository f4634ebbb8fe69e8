"""Generation: one base pipeline, fused UNet copies per model or expert mix, a bounded request queue.

Concurrency model.  The base pipeline is loaded once and never mutated: no adapter is ever
injected into it.  A merged model or a per-request mix is *fused* into a UNet copy that shares
every untouched parameter with the base UNet and owns new tensors only for the adapted
modules (zero LoRA overhead at inference, and memory proportional to the adapted weights).
Each pipeline call runs through a fresh pipeline view (the base components, the request's UNet, a
new scheduler and tokenizers no other call holds: fast tokenizers keep padding state between
calls), so concurrent calls share no mutable state.  Fused mixes live in an LRU cache bounded
by bytes and keyed by the resolved merge (experts, weights, method, density, seed).

Dynamic batching: requests for the same fused UNet with the same call-wide settings (size,
steps, scheduler, guidance, negative prompt or none) run as one batched pipeline call of up to
``serving_max_batch_size`` images, each with its own generator (its own seed) and prompts
(:class:`_Batch`).  A batched image equals the solo one within a pixel or two of rounding
(tests/unit/test_serving_batching.py states the tolerance); with batching off (size 1) it is
byte-identical.  A request with several prompts and ``batch_prompts`` runs its own images in calls
of up to ``serving_request_batch_size`` even where batching across requests is off (CPU): a
caller that asks for many prompts at once for throughput (evaluation) opts in, and each prompt can
carry its own seed (``prompt_seeds``).  Without it, and for any single-prompt request, nothing is
batched beyond ``serving_max_batch_size``, so a printed seed (or a dataset image rendered at batch
size 1) re-renders byte-identically on CPU.

Mixed batches (``serving_mixed_batch_min_mixes`` > 0): requests whose mixes are exact weighted
sums of LoRAs (``mean_delta``, exact rank) share one batch key whatever their mix; a call then
runs its rows unfused, each with its own mix (:mod:`selma_serving.mixed`), when at least that many
of its distinct mixes have no fused merge cached, and otherwise one fused call per mix.  A mix
that fails to resolve fails only its own requests.

Admission (:class:`Admission`): at most ``serving_max_concurrent`` batches hold a generation
slot and at most ``serving_max_queue`` requests wait; beyond that a request is refused
(ResourceExhausted with a ``retry-after-ms`` trailer).  The line is fair: by priority, then
round robin over clients.  Waiting honours the request's deadline and cancellation, and so
does denoising (checked after every step).
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from selma.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    SelmaError,
)
from selma.limits import check_chars, check_items
from selma.pipelines import ModelSpec, TokenizerPool, import_libraries, load_pipeline, make_scheduler
from selma.seeds import SeedPolicy, derive_seed
from selma_serving import metrics
from selma_serving.lora import BaseModelId, ExpertCache, check_against_unet, check_tensor_values
from selma_serving.merge import MergeParams, ResolvedMerge, merge, resolve
from selma_serving.mixed import RowMix, mixable, mixed_unet
from selma_serving.settings import ServingSettings

if TYPE_CHECKING:
    from selma_serving.registry import ModelRegistry

log = logging.getLogger(__name__)

SEED_POLICIES = tuple(p.value for p in SeedPolicy)  # GenerationRequest.seed_policy values
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED: integer milliseconds
MIXABLE = "mixable"  # batch key head of requests whose different mixes may share a call (BatchPolicy.mixed_min_mixes)
MAX_MIX_CHECKS = 4096  # verdicts of the value probe of mixes served unfused (Engine.check_mix_values)
MIXES_KIND = "mixes"  # metrics label (ServedInfo.kind) of images made in a call of several unfused mixes


def probe_deltas(deltas: dict[str, torch.Tensor], *, max_abs: float, what: str) -> None:
    """Every merged weight delta finite and at most ``max_abs`` (FAILED_PRECONDITION naming ``what`` and
    the tensor): the probe before a merge is served, fused (:func:`fused_copy`) or unfused."""
    check_tensor_values(deltas, what=f"{what} (merged weight deltas)", max_abs=max_abs)


def mix_label(rm: ResolvedMerge) -> str:
    """How errors about a per-request mix name it."""
    return f"the mix of {', '.join(rm.expert_ids)}"


def fused_copy(
    base_unet: torch.nn.Module,
    deltas: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    max_abs: float = math.inf,
    what: str = "the adapter",
) -> tuple[torch.nn.Module, int]:
    """A UNet equal to ``base_unet`` with ``deltas`` added (fp32, then cast) or ``weights`` replacing
    the named modules' weights.  Untouched parameters and buffers are shared, never copied; the
    base is not modified.  Returns (unet, bytes of the new tensors).

    The probe before anything is built: every delta finite and at most ``max_abs`` in magnitude,
    every replacement weight finite (FAILED_PRECONDITION naming ``what`` and the tensor); a model
    that would only ever produce NaN/black images is refused rather than served."""
    deltas = deltas or {}
    weights = weights or {}
    check_against_unet({n: tuple(d.shape) for n, d in itertools.chain(deltas.items(), weights.items())}, base_unet, what=what)
    probe_deltas(deltas, max_abs=max_abs, what=what)
    check_tensor_values(weights, what=f"{what} (fused weights)")
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(base_unet.parameters(), base_unet.buffers())}
    unet = copy.deepcopy(base_unet, memo)
    nbytes = 0
    with torch.no_grad():
        for name, value in itertools.chain(deltas.items(), weights.items()):
            mod = unet.get_submodule(name)
            w = mod.weight
            if name in deltas:
                new = (w.detach().float() + value.to(device=w.device, dtype=torch.float32)).to(w.dtype)
            else:
                new = value.to(device=w.device, dtype=w.dtype).clone()
            mod.weight = torch.nn.Parameter(new, requires_grad=False)  # replaces the shared one on the copy only
            nbytes += new.numel() * new.element_size()
    return unet, nbytes


class FusedCache:
    """LRU of fused UNets bounded by bytes; one build per key at a time (others wait for it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[torch.nn.Module, int]] = OrderedDict()
        self._building: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: Hashable, build: Callable[[], tuple[torch.nn.Module, int]]) -> tuple[torch.nn.Module, bool]:
        """(value, hit): the cached UNet for ``key``, or ``build()``'s, cached if it fits."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    metrics.MERGE_CACHE_HITS.inc()
                    return self._items[key][0], True
                pending = self._building.get(key)
                if pending is None:
                    self._building[key] = threading.Event()
                    break
            pending.wait()  # another request is building this mix; reuse its result
        metrics.MERGE_CACHE_MISSES.inc()
        try:
            value, nbytes = build()
            with self._lock:
                if nbytes <= self.max_bytes:
                    self._items[key] = (value, nbytes)
                    self.bytes += nbytes
                    while self.bytes > self.max_bytes and self._items:
                        _, (_, freed) = self._items.popitem(last=False)  # in-flight users keep their reference
                        self.bytes -= freed
                metrics.MERGE_CACHE_BYTES.set(self.bytes)
            return value, False
        finally:
            with self._lock:
                self._building.pop(key).set()

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached now (no hit or miss is counted)."""
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
            metrics.MERGE_CACHE_BYTES.set(0)

    def __len__(self) -> int:
        return len(self._items)


PRIORITIES = {"low": 0, "normal": 1, "high": 2}  # GenerateRequest.priority; "" = normal


@dataclass(eq=False)
class Ticket:
    """One request's place in line: who asks (client), how urgently, and what it could be batched with."""

    client: str = ""
    priority: int = PRIORITIES["normal"]
    key: Hashable | None = None  # batch key; None = never a companion in another request's batch
    rows: int = 1  # images it asks for
    granted: bool = False  # holds a slot of its own (leads a batch)
    batch: Any = None  # the batch it joined as a companion
    payload: Any = None  # the engine's request state
    enqueued: float = field(default_factory=time.monotonic)


class Admission:
    """Generation slots plus a bounded, fair waiting line.

    Waiting tickets are served by priority, then round robin over clients (each client's own
    tickets first in, first out): a client with a hundred queued requests gets one turn, then
    every other waiting client gets one.  A slot is handed to the head of the line when it frees
    (no race between waiters).  Tickets that can share a batch with a running request are
    taken from anywhere in the line, in the same fair order (:meth:`take`), or join an open
    batch directly on arrival (:meth:`open_batch`)."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self.max_batch_size = 1  # for the retry-after estimate; the engine sets it
        self.call_seconds = 1.0  # moving average of one pipeline call (the retry-after estimate's unit)
        self._cond = threading.Condition()
        self._lines: dict[int, OrderedDict[str, deque[Ticket]]] = {}
        self._open: dict[Hashable, list[Any]] = {}

    # --- the line (callers hold self._cond)

    def _order(self) -> list[Ticket]:
        out: list[Ticket] = []
        for prio in sorted(self._lines, reverse=True):
            queues = [q for q in self._lines[prio].values() if q]
            for r in range(max((len(q) for q in queues), default=0)):
                out.extend(q[r] for q in queues if r < len(q))
        return out

    def _remove(self, t: Ticket) -> None:
        """Take ``t`` out of the line; its client moves to the back of the rotation."""
        clients = self._lines[t.priority]
        clients[t.client].remove(t)
        if clients[t.client]:
            clients.move_to_end(t.client)
        else:
            del clients[t.client]
        self.waiting -= 1
        metrics.QUEUE_DEPTH.set(self.waiting)
        metrics.QUEUE_WAIT.observe(time.monotonic() - t.enqueued)

    def _grant(self) -> None:
        while self.running < self.max_concurrent:
            order = self._order()
            if not order:
                return
            self._remove(order[0])
            order[0].granted = True
            self.running += 1
            metrics.IN_FLIGHT.set(self.running)
        self._cond.notify_all()

    def retry_after_ms(self) -> int:
        """How long a refused client should wait: the calls needed to clear the line ahead of it."""
        with self._cond:
            rows = sum(t.rows for q in self._lines.values() for line in q.values() for t in line)
            calls = math.ceil(rows / max(1, self.max_batch_size)) + self.running
            ms = calls * self.call_seconds * 1000 / max(1, self.max_concurrent)
        return int(min(max(ms, 100), 60_000))

    def observe_call(self, seconds: float) -> None:
        with self._cond:
            self.call_seconds = 0.8 * self.call_seconds + 0.2 * seconds

    # --- tickets

    def enqueue(self, t: Ticket) -> None:
        """Join an open batch, take a free slot, or wait in line; ResourceExhausted (with a
        ``retry-after-ms`` trailer) when the line is full."""
        with self._cond:
            if t.key is not None:
                for batch in self._open.get(t.key, ()):
                    if batch.admit(t):
                        t.batch = batch
                        metrics.QUEUE_WAIT.observe(0.0)
                        self._cond.notify_all()
                        return
            if self.running < self.max_concurrent and not self.waiting:
                t.granted = True
                self.running += 1
                metrics.IN_FLIGHT.set(self.running)
                metrics.QUEUE_WAIT.observe(0.0)
                return
            if self.waiting >= self.max_queue:
                metrics.REJECTED.inc()
                running, waiting = self.running, self.waiting
            else:
                self._lines.setdefault(t.priority, OrderedDict()).setdefault(t.client, deque()).append(t)
                self.waiting += 1
                metrics.QUEUE_DEPTH.set(self.waiting)
                self._cond.notify_all()  # lets observers (tests, drains, forming batches) see the new waiter
                return
        retry = self.retry_after_ms()
        raise ResourceExhausted(
            f"the server is busy ({running} generating, {waiting} waiting, queue limit {self.max_queue}); "
            f"retry in about {retry} ms",
            trailers=((RETRY_AFTER_KEY, str(retry)),),
        )

    def position(self, t: Ticket) -> int:
        """1-based place of ``t`` in the line; 0 once it is no longer waiting."""
        with self._cond:
            order = self._order()
            return order.index(t) + 1 if t in order else 0

    def wait(self, t: Ticket, *, check: Callable[[], None], timeout: float | None = None) -> bool:
        """Wait until ``t`` has a slot or a batch (True), or ``timeout`` passed (False).  ``check``
        raises to give up (cancelled, deadline): the ticket then leaves the line."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (t.granted or t.batch is not None):
                try:
                    check()
                except BaseException:
                    self._remove(t)
                    self._cond.notify_all()
                    raise
                left = 1.0 if end is None else end - time.monotonic()
                if left <= 0:
                    return False
                # Bounded waits: a cancel callback notifies, the bound covers a missed wake-up.
                self._cond.wait(timeout=min(left, 1.0))
            return True

    def release(self) -> None:
        """Give a slot back; the head of the line gets it."""
        with self._cond:
            self.running -= 1
            metrics.IN_FLIGHT.set(self.running)
            self._grant()
            self._cond.notify_all()

    def take(self, key: Hashable, room: int, batch: Any) -> list[Ticket]:
        """Waiting tickets with batch key ``key`` and at most ``room`` rows in all, in fair order: they join ``batch``."""
        taken: list[Ticket] = []
        with self._cond:
            for t in self._order():
                if t.key == key and t.rows <= room:
                    self._remove(t)
                    t.batch = batch
                    taken.append(t)
                    room -= t.rows
            if taken:
                self._cond.notify_all()
        return taken

    def open_batch(self, key: Hashable, batch: Any) -> None:
        with self._cond:
            self._open.setdefault(key, []).append(batch)

    def close_batch(self, key: Hashable, batch: Any) -> None:
        with self._cond:
            batches = self._open.get(key, [])
            if batch in batches:
                batches.remove(batch)
            if not batches:
                self._open.pop(key, None)

    @contextmanager
    def slot(self, *, deadline: float | None = None, cancel: threading.Event | None = None,
             client: str = "", priority: int = PRIORITIES["normal"]) -> Iterator[None]:
        """Hold a slot for the block; ResourceExhausted if the line is full, Cancelled/DeadlineExceeded while waiting."""

        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the request was cancelled while queued")
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the deadline passed while the request was queued")

        t = Ticket(client=client, priority=priority)
        self.enqueue(t)
        self.wait(t, check=check)
        try:
            yield
        finally:
            self.release()

    def wake(self) -> None:
        """Let waiters re-check their cancel flags now."""
        with self._cond:
            self._cond.notify_all()


@dataclass
class GenerationRequest:
    """A Generate call in domain terms (mirrors ``selma.v1.GenerateRequest``)."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 0
    guidance_scale: float | None = None
    width: int = 0
    height: int = 0
    scheduler: str = ""
    images_per_prompt: int = 0
    seed: int | None = None
    seed_policy: str = "derived"
    model_name: str = ""
    merge: MergeParams | None = None
    prompt_seeds: list[int] = field(default_factory=list)  # one base seed per prompt (then ``seed`` is unused)
    batch_prompts: bool = False  # several prompts: batched calls of up to serving_request_batch_size images


@dataclass(frozen=True)
class ServedInfo:
    """The model that actually produced an image."""

    model_name: str
    base_model: BaseModelId
    merge: ResolvedMerge | None
    merge_dict: dict[str, Any] | None
    fused: bool
    cache_hit: bool
    kind: str  # metrics label: base, registered, mix, or mixes (several mixes unfused in one call)


@dataclass
class GeneratedImage:
    """One image with everything needed to reproduce it."""

    png: bytes
    seed: int
    prompt: str
    prompt_index: int
    image_index: int
    width: int
    height: int
    index: int
    total: int
    seconds: float
    served: ServedInfo = field(repr=False)


@dataclass(frozen=True)
class QueueProgress:
    """Where a request stands before its images: waiting (position in line) or generating."""

    position: int  # 1-based place in line; 0 = generating
    queue_length: int  # requests waiting in all
    batch_size: int = 0  # images in the pipeline call it runs in (when generating)


@dataclass(frozen=True)
class BatchPolicy:
    """How many images one pipeline call may carry and how long a new batch waits for companions.

    ``mixed_min_mixes`` > 0: requests with different mixable expert mixes (:func:`selma_serving.mixed.mixable`)
    share batches, and a call runs them unfused, each row with its own mix, when at least that many
    of its distinct mixes have no fused merge cached; otherwise each mix runs fused, one call per mix."""

    max_size: int = 1
    wait_seconds: float = 0.0
    mixed_min_mixes: int = 0
    request_size: int = 1  # images of one multi-prompt request per call (at least max_size)


@dataclass
class _Row:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    index: int


def _row_seed(req: GenerationRequest, prompt_index: int, image_index: int) -> int:
    """Image ``image_index`` of prompt ``prompt_index``'s seed: with ``prompt_seeds``, as if that
    prompt were requested alone with its own seed; otherwise from the request's seed."""
    if req.prompt_seeds:
        return derive_seed(req.seed_policy, req.prompt_seeds[prompt_index], 0, image_index, req.images_per_prompt)
    return derive_seed(req.seed_policy, req.seed or 0, prompt_index, image_index, req.images_per_prompt)


class _Member:
    """A request inside a batch: its rows still to run, what it has been sent, and how it leaves."""

    def __init__(self, req: GenerationRequest, ticket: Ticket, *, cancel: threading.Event, is_active: Callable[[], bool],
                 deadline: float | None, progress: bool, arrived: float) -> None:
        self.req, self.ticket, self.cancel, self.is_active, self.deadline = req, ticket, cancel, is_active, deadline
        self.progress, self.arrived = progress, arrived
        self.total = len(req.prompts) * req.images_per_prompt
        self.rows: deque[_Row] = deque(
            _Row(p_i, i_i, prompt, _row_seed(req, p_i, i_i), p_i * req.images_per_prompt + i_i)
            for p_i, prompt in enumerate(req.prompts)
            for i_i in range(req.images_per_prompt)
        )  # the same seeds as render
        self.items: deque[Any] = deque()  # GeneratedImage | QueueProgress | BaseException, guarded by the admission lock
        self.done = False  # answered in full or gone: no more rows run for it
        self.sent = 0
        self.stepped = False
        self.announced = False
        self.served: ServedInfo | None = None

    def gone(self) -> SelmaError | None:
        """Why this request no longer wants its images (None while it does)."""
        if self.cancel.is_set() or not self.is_active():
            return Cancelled("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded("the request's deadline passed during generation")
        return None


class _Batch:
    """Requests sharing one fused UNet and one set of call settings, run as batched pipeline calls.

    The leader (the request that got the slot) runs the calls in its own thread; companions wait
    for their images.  Each call takes up to ``max_size`` rows, round robin over the members, so
    a long request does not hold back a short one.  While the leader has rows left, compatible
    requests join at the next call (from the line, or on arrival).  A member that is cancelled
    or past its deadline is answered at once and its rows are dropped from later calls; rows it
    has in the running call are computed to the end of that call and thrown away (diffusers
    cannot drop a row mid-loop), unless every row's owner is gone, which stops the call at the
    next step.  If the leader leaves while companions have rows left, a thread finishes them
    and then gives the slot back."""

    def __init__(self, engine: Engine, leader: _Member, key: Hashable | None, policy: BatchPolicy) -> None:
        self.engine, self.key, self.policy = engine, key, policy
        self.adm = engine.admission
        self.leader = leader
        self.members: list[_Member] = [leader]
        self.pending: list[Ticket] = []  # joined on arrival, enter at the next call
        self.unet: torch.nn.Module | None = None
        self.served: ServedInfo | None = None
        self.closed = key is None or policy.max_size <= 1
        self.mixable = isinstance(key, tuple) and key[0] == MIXABLE  # members may have different mixes
        # images per pipeline call: a multi-prompt leader's own rows may fill a larger call
        self.call_size = (max(policy.max_size, policy.request_size) if leader.req.batch_prompts and len(leader.req.prompts) > 1
                          else policy.max_size)

    # called by Admission.enqueue under its lock
    def admit(self, t: Ticket) -> bool:
        if self.closed or self.leader.done or not self.leader.rows:
            return False
        if self._outstanding() + t.rows > self.policy.max_size:
            return False
        self.pending.append(t)
        return True

    def _outstanding(self) -> int:
        return sum(len(m.rows) for m in self.members if not m.done) + sum(t.rows for t in self.pending)

    def _deliver(self, m: _Member, item: Any) -> None:
        with self.adm._cond:
            if m.done:
                return  # it already left (its own thread saw the cancel or deadline first)
            m.items.append(item)
            if isinstance(item, GeneratedImage):
                m.sent += 1
            if isinstance(item, BaseException) or m.sent == m.total:
                m.done = True
                m.rows.clear()
            self.adm._cond.notify_all()

    def _join(self, tickets: list[Ticket]) -> None:
        with self.adm._cond:
            self.members.extend(t.payload for t in tickets)

    def _gather(self, *, first: bool) -> None:
        """Companions for the next call: those that joined on arrival, then the line (waiting up
        to the batch wait before the first call when there is room)."""
        if self.closed:
            return
        assert self.key is not None
        end = time.monotonic() + (self.policy.wait_seconds if first else 0.0)
        while True:
            with self.adm._cond:
                joined, self.pending = self.pending, []
            self._join(joined)
            room = self.policy.max_size - self._outstanding()
            if room > 0:
                self._join(self.adm.take(self.key, room, self))
                room = self.policy.max_size - self._outstanding()
            left = end - time.monotonic()
            if room <= 0 or left <= 0:
                return
            with self.adm._cond:
                if not self.pending:
                    self.adm._cond.wait(timeout=left)  # an arrival notifies

    def _resolve(self) -> None:
        if self.unet is None:
            self.unet, self.served = self.engine.resolve_model(self.leader.req)
        for m in self.members:
            if m.served is None:
                assert self.served is not None
                if m is self.leader or self.served.kind != "mix":
                    m.served = self.served
                else:  # the fused mix built (or found) for the leader is reused: a hit for this request
                    metrics.MERGE_CACHE_HITS.inc()
                    m.served = replace(self.served, cache_hit=True)

    def _pick(self) -> list[tuple[_Member, _Row]]:
        rows: list[tuple[_Member, _Row]] = []
        with self.adm._cond:  # a member's own thread may drop its rows (cancelled) meanwhile
            live = [m for m in self.members if not m.done and m.rows]
            while live and len(rows) < self.call_size:
                for m in list(live):
                    if len(rows) >= self.call_size:
                        break
                    rows.append((m, m.rows.popleft()))
                    if not m.rows:
                        live.remove(m)
        return rows

    def step(self, *, gather: bool, first: bool) -> bool:
        """Run one call; False when no member has rows left."""
        for m in self.members:
            if not m.done and (err := m.gone()) is not None:
                self._deliver(m, err)
        if gather and not self.leader.done:
            self._gather(first=first)
        rows = self._pick()
        if not rows:
            return False
        try:
            if self.mixable:
                self._run_mixes(rows)
            else:
                self._resolve()
                assert self.unet is not None and self.served is not None
                self._call(rows, self.unet, self.served.kind)
        except SelmaError as e:
            for m in {id(m): m for m, _ in rows}.values():
                if not m.done:
                    self._deliver(m, e)
            if not isinstance(e, (Cancelled, DeadlineExceeded)) and not self.mixable:
                for m in self.members:  # the same model and settings: the same failure
                    if not m.done:
                        self._deliver(m, e)
        except Exception as e:  # noqa: BLE001 - every member of the call gets it; logged by the interceptor
            for m in self.members:
                if not m.done:
                    self._deliver(m, e)
        return True

    def _run_mixes(self, rows: list[tuple[_Member, _Row]]) -> None:
        """Rows of several mixes: one unfused call (each row its own mix) when at least
        ``mixed_min_mixes`` of the mixes have no fused merge cached, else one fused call per mix."""
        engine = self.engine
        groups: dict[MergeParams, list[tuple[_Member, _Row]]] = {}
        for m, r in rows:
            assert m.req.merge is not None
            groups.setdefault(m.req.merge, []).append((m, r))
        resolved: dict[MergeParams, RowMix] = {}
        for params, group in groups.items():
            try:
                resolved[params] = engine.resolve_mix(params)
            except SelmaError as e:  # this mix's own fault (unknown expert, bad weight): only its requests get it
                for m in {id(m): m for m, _ in group}.values():
                    self._deliver(m, e)
        cold = [p for p, mix in resolved.items() if mix.rm not in engine.cache]
        if len(resolved) > 1 and len(cold) >= self.policy.mixed_min_mixes:
            for params in cold:  # the probe a fused build runs (cached mixes passed it): unfused rows get it too
                try:
                    engine.check_mix_values(resolved[params])
                except SelmaError as e:
                    del resolved[params]
                    for m in {id(m): m for m, _ in groups[params]}.values():
                        self._deliver(m, e)
            order = list(resolved)
            live = [(m, r) for m, r in rows if m.req.merge in resolved and not m.done]
            unet = mixed_unet(engine.base_unet, [resolved[p] for p in order], [order.index(m.req.merge) for m, _ in live])
            for m, _ in live:
                rm = resolved[m.req.merge].rm
                m.served = ServedInfo("", engine.base_id, rm, rm.to_dict(), False, False, MIXES_KIND)
            if live:
                self._call(live, unet, MIXES_KIND)
            return
        for params in resolved:
            group = [(m, r) for m, r in groups[params] if not m.done]
            owners = {id(m): m for m, _ in group}.values()
            try:
                if not group:
                    continue
                unet, rm, hit = engine.fused_mix(resolved[params])
                for i, m in enumerate(owners):
                    if i:  # the fused mix built (or found) for the first is reused: a hit for the others
                        metrics.MERGE_CACHE_HITS.inc()
                    m.served = ServedInfo("", engine.base_id, rm, rm.to_dict(), True, hit or i > 0, "mix")
                self._call(group, unet, "mix")
            except SelmaError as e:  # its fused mix failed the probe, or all its requests left: the other mixes go on
                for m in owners:
                    self._deliver(m, e)

    def _call(self, rows: list[tuple[_Member, _Row]], unet: torch.nn.Module, kind: str) -> None:
        req = self.leader.req
        owners = {id(m): m for m, _ in rows}
        metrics.BATCH_SIZE.labels(kind).observe(len(rows))
        for m in owners.values():
            if m.progress and not m.announced:
                m.announced = True
                self._deliver(m, QueueProgress(0, self.adm.waiting, len(rows)))

        def on_step(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            alive = False
            for m in owners.values():
                if m.done:
                    continue
                err = m.gone()
                if err is not None:
                    self._deliver(m, err)
                    continue
                alive = True
                if not m.stepped:
                    m.stepped = True
                    metrics.FIRST_STEP_SECONDS.labels(kind).observe(time.monotonic() - m.arrived)
            if not alive:
                raise Cancelled("every request in the batch is gone")  # raising here stops denoising at once
            return kwargs

        prompts = [r.prompt for _, r in rows]
        negs = [m.req.negative_prompt for m, _ in rows]
        # a CPU generator per image, as render uses: the same seed gives the same noise on every device,
        # so a dataset image (rendered anywhere) is reproduced by Generate (diffusers moves it)
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) for _, r in rows]
        if len(set(prompts)) == 1 and len(set(negs)) == 1:  # one prompt encoded once, n images of it
            text: dict[str, Any] = {"prompt": prompts[0], "negative_prompt": negs[0] or None, "num_images_per_prompt": len(rows)}
        else:  # the batch key keeps negative prompts all-or-none (SDXL treats None and "" differently)
            text = {"prompt": prompts, "negative_prompt": negs if negs[0] else None, "num_images_per_prompt": 1}
        t0 = time.perf_counter()
        with self.engine.tokenizers() as tokenizers:
            out = self.engine.pipeline_view(unet, req.scheduler, tokenizers)(
                **text,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                width=req.width,
                height=req.height,
                generator=gens[0] if len(gens) == 1 else gens,
                output_type="pil",
                callback_on_step_end=on_step,
            )
        seconds = time.perf_counter() - t0
        self.adm.observe_call(seconds)
        metrics.IMAGE_SECONDS.labels(kind).observe(seconds)
        for (m, r), image in zip(rows, out.images, strict=True):
            if m.done:
                continue  # left during the call: its row is thrown away
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            metrics.IMAGES_GENERATED.labels(kind).inc()
            assert m.served is not None
            self._deliver(m, GeneratedImage(
                png=buf.getvalue(), seed=r.seed, prompt=r.prompt, prompt_index=r.prompt_index, image_index=r.image_index,
                width=req.width, height=req.height, index=r.index, total=m.total, seconds=seconds, served=m.served,
            ))

    def finish(self) -> None:
        """Companions left with rows get a thread of their own; the slot goes back when all are done."""
        with self.adm._cond:
            self.closed = True
        if self.key is not None:
            self.adm.close_batch(self.key, self)
        self._gather_pending_only()
        if any(not m.done and m.rows for m in self.members):
            threading.Thread(target=self._run_rest, name="selma-batch", daemon=True).start()
        else:
            self.adm.release()

    def _gather_pending_only(self) -> None:
        with self.adm._cond:
            joined, self.pending = self.pending, []
        self._join(joined)

    def _run_rest(self) -> None:
        try:
            while self.step(gather=False, first=False):
                pass
        finally:
            self.adm.release()


def batch_policy(settings: ServingSettings, device: str) -> BatchPolicy:
    """The configured batching, or the device's default: 8 images on an accelerator (a batch-1 UNet
    leaves most of a GPU idle); none on CPU, where one batched call gains little (~1.3x at 8
    clients on the tiny model) and solo calls keep a printed seed's image byte-identical when
    re-rendered alone (batched ones match it within a pixel level of rounding)."""
    accel = device != "cpu"
    size = settings.serving_max_batch_size or (8 if accel else 1)
    wait_ms = settings.serving_batch_wait_ms if settings.serving_batch_wait_ms is not None else (5.0 if accel else 20.0)
    return BatchPolicy(max_size=size, wait_seconds=wait_ms / 1000 if size > 1 else 0.0,
                       mixed_min_mixes=settings.serving_mixed_batch_min_mixes if size > 1 else 0,
                       request_size=max(size, settings.serving_request_batch_size))


class Engine:
    """The base pipeline and everything that generates with it."""

    def __init__(self, settings: ServingSettings, experts: ExpertCache) -> None:
        self.settings = settings
        self.experts = experts
        self.base_id = BaseModelId(settings.serving_base_model.rstrip("/"), settings.serving_base_revision, settings.serving_base_variant)
        self.pipe: Any = None
        self.cache = FusedCache(settings.serving_merge_cache_bytes)
        self._mix_checks: OrderedDict[ResolvedMerge, SelmaError | None] = OrderedDict()
        self._mix_checks_lock = threading.Lock()
        self.admission = Admission(settings.serving_max_concurrent, settings.serving_max_queue)
        self.batching = BatchPolicy()  # set for the device when the base model loads
        self.registry: ModelRegistry | None = None
        self._load_lock = threading.Lock()
        self._view_kwargs: dict[str, Any] = {}
        self._tokenizers: TokenizerPool | None = None

    # --- base model

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load_base(self) -> None:
        """Load the base pipeline once (safetensors only); the service is SERVING only afterwards."""
        with self._load_lock:
            if self.pipe is not None:
                return
            if not self.base_id.source:
                raise FailedPrecondition("no base model configured; set SELMA_SERVING_BASE_MODEL", field="serving_base_model")
            import_libraries()  # start-up, not model loading (selma_startup_phase_seconds)
            t0 = time.perf_counter()
            pipe = load_pipeline(
                ModelSpec(self.base_id.source, self.base_id.revision, self.base_id.variant, self.settings.serving_base_vae),
                self.settings,
            )
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False)
                    module.eval()
            # Views must be built like the base: pass its registered init options (e.g. SDXL's
            # force_zeros_for_empty_prompt), and never ask for the safety checker it was loaded without.
            params = inspect.signature(type(pipe).__init__).parameters
            self._view_kwargs = {k: pipe.config[k] for k in params if k not in pipe.components and k != "self" and k in pipe.config}
            if "requires_safety_checker" in params:
                self._view_kwargs["requires_safety_checker"] = False
            self._tokenizers = TokenizerPool(pipe.components)
            self.batching = batch_policy(self.settings, pipe.device.type)
            log.info("batching: up to %d images per call, %.0f ms wait for companions", self.batching.max_size, self.batching.wait_seconds * 1000)
            self.pipe = pipe
            metrics.MODEL_LOAD_SECONDS.labels("base").observe(time.perf_counter() - t0)
            log.info("base model %s ready", self.base_id)

    def _require_pipe(self) -> Any:
        if self.pipe is None:
            raise FailedPrecondition("the base model is not loaded yet; wait for SERVING")
        return self.pipe

    @property
    def base_unet(self) -> torch.nn.Module:
        return self._require_pipe().unet

    def check_base(self, base: BaseModelId, what: str) -> None:
        """Adapters must belong to the served base model."""
        if base != self.base_id:
            raise FailedPrecondition(f"{what} was trained on {base}, but this service serves {self.base_id}", field="experts")

    # --- per-request mixes

    def resolve_mix(self, params: MergeParams) -> RowMix:
        """A per-request mix checked against its experts and the base UNet, with every default filled
        in (``rm`` is also the fused-cache key)."""
        adapters = [self.experts.get(e.ref, field_name=f"experts[{i}].expert_id") for i, e in enumerate(params.experts)]
        rm = resolve(params, adapters, default_density=self.settings.serving_default_density,
                     max_weight=self.settings.serving_max_merge_weight)
        for a in adapters:
            self.check_base(a.base_model, f"expert {a.id}")
        if rm.method == "mean_delta" and rm.output_rank == 0:
            rm = replace(rm, fuse=True)  # the exact LoRA and the fused delta are the same model
        check_against_unet({n: m.weight_shape for n, m in adapters[0].modules.items()}, self.base_unet, what=f"expert {adapters[0].id}")
        return RowMix(rm, tuple(adapters))

    def check_mix_values(self, mix: RowMix) -> None:
        """The probe of a fused build for a mix served unfused: its merged deltas finite and at most
        ``serving_max_adapter_value`` (FAILED_PRECONDITION naming the tensor).  The verdict is cached
        per resolved mix (bounded), so a mix pays the merge once, not at every call."""
        with self._mix_checks_lock:
            if mix.rm in self._mix_checks:
                self._mix_checks.move_to_end(mix.rm)
                error = self._mix_checks[mix.rm]
                if error is not None:
                    raise error
                return
        error: SelmaError | None = None
        try:
            deltas = merge(list(mix.adapters), mix.rm).effective_deltas()
            probe_deltas(deltas, max_abs=self.settings.serving_max_adapter_value, what=mix_label(mix.rm))
        except SelmaError as e:
            error = e
        with self._mix_checks_lock:
            self._mix_checks[mix.rm] = error
            while len(self._mix_checks) > MAX_MIX_CHECKS:
                self._mix_checks.popitem(last=False)
        if error is not None:
            raise error

    def mix_unet(self, params: MergeParams) -> tuple[torch.nn.Module, ResolvedMerge, bool]:
        """The fused UNet for a per-request expert mix: (unet, resolved merge, cache hit)."""
        return self.fused_mix(self.resolve_mix(params))

    def fused_mix(self, mix: RowMix) -> tuple[torch.nn.Module, ResolvedMerge, bool]:
        """The fused UNet of a resolved mix, from the cache or merged and fused now: (unet, resolved merge, cache hit)."""
        rm, adapters = mix.rm, list(mix.adapters)
        base_unet = self.base_unet

        def build() -> tuple[torch.nn.Module, int]:
            t0 = time.perf_counter()
            result = merge(adapters, rm)
            unet, nbytes = fused_copy(base_unet, deltas=result.effective_deltas(), max_abs=self.settings.serving_max_adapter_value,
                                      what=mix_label(rm))
            metrics.MERGE_SECONDS.labels("request").observe(time.perf_counter() - t0)
            return unet, nbytes

        unet, hit = self.cache.get(rm, build)
        return unet, rm, hit

    # --- generation

    def native_size(self) -> int:
        pipe = self._require_pipe()
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def default_guidance(self) -> float:
        return 5.0 if "XL" in type(self._require_pipe()).__name__ else 7.5

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """Check limits and fill defaults (INVALID_ARGUMENT naming the field)."""
        s = self.settings
        if not req.prompts:
            raise InvalidArgument("give at least one prompt", field="prompts")
        check_items(len(req.prompts), "prompts", s.serving_max_prompts, "serving_max_prompts", "prompts")
        # characters first (cheap), then tokens: nothing unbounded ever reaches the tokenizer
        for i, p in enumerate(req.prompts):
            check_chars(p, f"prompts[{i}]", s.max_prompt_chars, "max_prompt_chars")
            if not p or not p.strip():
                raise InvalidArgument(f"prompts[{i}] is empty", field=f"prompts[{i}]")
        check_chars(req.negative_prompt, "diffusion.negative_prompt", s.max_prompt_chars, "max_prompt_chars")
        for i, p in enumerate(req.prompts):
            self.check_prompt_tokens(p, f"prompts[{i}]")
        if req.negative_prompt:
            self.check_prompt_tokens(req.negative_prompt, "diffusion.negative_prompt")
        ipp = req.images_per_prompt or 1
        if not 1 <= ipp <= s.serving_max_images_per_prompt:
            raise InvalidArgument(
                f"images_per_prompt must be 1..SELMA_SERVING_MAX_IMAGES_PER_PROMPT={s.serving_max_images_per_prompt}; got {req.images_per_prompt}",
                field="images_per_prompt",
            )
        steps = req.steps or min(50, s.serving_max_steps)  # 0 = 50, within a lower configured limit
        if not 1 <= steps <= s.serving_max_steps:
            raise InvalidArgument(f"diffusion.steps must be 1..SELMA_SERVING_MAX_STEPS={s.serving_max_steps}; got {req.steps}", field="diffusion.steps")
        guidance = self.default_guidance() if req.guidance_scale is None else req.guidance_scale
        if not math.isfinite(guidance) or not 0 <= guidance <= 30:
            raise InvalidArgument(f"diffusion.guidance_scale must be in [0, 30]; got {req.guidance_scale}", field="diffusion.guidance_scale")
        native = self.native_size()
        # the model's own maximum: a denoising step costs ~size² (attention more), and cancellation is checked per step
        model_max = int(s.serving_max_size_factor * native) // 8 * 8
        size = {}
        for name in ("width", "height"):
            v = getattr(req, name) or native
            if v < 8 or v % 8 or v > s.serving_max_resolution:
                raise InvalidArgument(
                    f"diffusion.{name} must be a multiple of 8 up to SELMA_SERVING_MAX_RESOLUTION={s.serving_max_resolution}; got {getattr(req, name)}",
                    field=f"diffusion.{name}",
                )
            if v > model_max:
                raise InvalidArgument(
                    f"diffusion.{name} {v} is over this model's maximum {model_max} "
                    f"(SELMA_SERVING_MAX_SIZE_FACTOR={s.serving_max_size_factor:g} x its native {native})",
                    field=f"diffusion.{name}",
                )
            size[name] = v
        if req.seed_policy not in SEED_POLICIES:
            raise InvalidArgument(f"unknown seed policy {req.seed_policy!r}", field="seed_policy")
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2^63); got {req.seed}", field="seed")
        if req.prompt_seeds:
            if len(req.prompt_seeds) != len(req.prompts):
                raise InvalidArgument(f"prompt_seeds must hold one seed per prompt ({len(req.prompts)}); got {len(req.prompt_seeds)}",
                                      field="prompt_seeds")
            if req.seed is not None:
                raise InvalidArgument("give seed or prompt_seeds, not both", field="prompt_seeds")
            for i, v in enumerate(req.prompt_seeds):
                if not 0 <= v < 2**63:
                    raise InvalidArgument(f"prompt_seeds[{i}] must be in [0, 2^63); got {v}", field=f"prompt_seeds[{i}]")
        if req.model_name and req.merge is not None:
            raise InvalidArgument("give model_name or experts, not both", field="model")
        make_scheduler(self._require_pipe(), req.scheduler)  # InvalidArgument for an unknown scheduler
        return replace(
            req,
            images_per_prompt=ipp,
            steps=steps,
            guidance_scale=guidance,
            width=size["width"],
            height=size["height"],
            seed=req.prompt_seeds[0] if req.prompt_seeds else secrets.randbits(63) if req.seed is None else req.seed,
        )

    def check_prompt_tokens(self, prompt: str, fld: str) -> None:
        """At most ``serving_max_prompt_tokens`` tokens of the base pipeline's (first) tokenizer."""
        tokenizer = getattr(self._require_pipe(), "tokenizer", None)
        if tokenizer is None:
            return
        n = len(tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
        check_items(n, fld, self.settings.serving_max_prompt_tokens, "serving_max_prompt_tokens", "tokens")

    def resolve_model(self, req: GenerationRequest) -> tuple[torch.nn.Module, ServedInfo]:
        if req.model_name and req.model_name != "base":
            if self.registry is None:
                raise FailedPrecondition("no model registry configured")
            unet, entry, held = self.registry.unet_and_hit(req.model_name)  # held: the "cache hit" of a registered model
            return unet, ServedInfo(req.model_name, self.base_id, None, entry.merge, True, held, "registered")
        if req.merge is not None:
            unet, rm, hit = self.mix_unet(req.merge)
            return unet, ServedInfo("", self.base_id, rm, rm.to_dict(), True, hit, "mix")
        return self.base_unet, ServedInfo("", self.base_id, None, None, False, False, "base")

    def pipeline_view(self, unet: torch.nn.Module, scheduler: str, tokenizers: dict[str, Any] | None = None) -> Any:
        """A per-image pipeline: shared frozen components, this request's UNet, a fresh scheduler
        and, for concurrent use, tokenizers borrowed from :meth:`tokenizers` (fast tokenizers are stateful)."""
        pipe = self._require_pipe()
        components = {**pipe.components, **(tokenizers or {}), "unet": unet, "scheduler": make_scheduler(pipe, scheduler)}
        view = type(pipe)(**components, **self._view_kwargs)
        view.set_progress_bar_config(disable=True)
        return view

    @contextmanager
    def tokenizers(self) -> Iterator[dict[str, Any]]:
        """Tokenizer copies no concurrent request holds (see :class:`selma.pipelines.TokenizerPool`)."""
        self._require_pipe()
        assert self._tokenizers is not None
        with self._tokenizers.borrow() as held:
            yield held

    def batch_key(self, req: GenerationRequest) -> Hashable:
        """What must match for two validated requests to share one pipeline call: the fused UNet
        (registered name, mix parameters or base) and every call-wide setting.  Negative prompts
        are all-or-none per call (SDXL treats None and "" differently), so having one is part of it."""
        if req.model_name and req.model_name != "base":
            model: tuple[Any, ...] = ("registered", req.model_name)
        elif req.merge is not None and self.batching.mixed_min_mixes and mixable(req.merge):
            return (MIXABLE, req.width, req.height, req.steps, req.scheduler, float(req.guidance_scale or 0), bool(req.negative_prompt))
        elif req.merge is not None:
            model = ("mix", req.merge)
        else:
            model = ("base",)
        return (model, req.width, req.height, req.steps, req.scheduler, float(req.guidance_scale or 0), bool(req.negative_prompt))

    def generate(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        is_active: Callable[[], bool] = lambda: True,
        deadline: float | None = None,
        client: str = "",
        priority: str = "",
        progress: bool = False,
    ) -> Iterator[Any]:
        """Validate, queue (fairly, by ``client`` and ``priority``), then yield the images in
        (prompt, image) order, run in batches with compatible requests.  With ``progress``,
        :class:`QueueProgress` items come first (each change of place in line, then the start)."""
        arrived = time.monotonic()
        t_start = time.perf_counter()
        req = self.validate(req)
        cancel = cancel or threading.Event()
        policy = self.batching
        ticket = Ticket(client=client, priority=PRIORITIES[priority or "normal"], key=self.batch_key(req) if policy.max_size > 1 else None,
                        rows=len(req.prompts) * req.images_per_prompt)
        member = _Member(req, ticket, cancel=cancel, is_active=is_active, deadline=deadline, progress=progress, arrived=arrived)
        ticket.payload = member
        adm = self.admission
        adm.max_batch_size = policy.max_size

        def check() -> None:
            if (err := member.gone()) is not None:
                raise err

        adm.enqueue(ticket)
        place = -1
        while not adm.wait(ticket, check=check, timeout=0.5 if progress else None):
            now = adm.position(ticket)
            if now != place and now:
                place = now
                yield QueueProgress(now, adm.waiting)
        kind = "base"
        if ticket.granted:
            batch = _Batch(self, member, ticket.key, policy)
            if not batch.closed:
                adm.open_batch(ticket.key, batch)
            try:
                first = True
                while True:
                    yield from self._drain(member, wait=False)
                    if member.done and not member.items:
                        break
                    if not batch.step(gather=True, first=first):
                        break
                    first = False
                yield from self._drain(member, wait=False)
            finally:
                self._leave(member)  # a consumer that stops early is gone: its rows are not run
                batch.finish()
        else:
            try:
                yield from self._drain(member, wait=True)
            finally:
                self._leave(member)
        if member.served is not None:
            kind = member.served.kind
        metrics.REQUEST_SECONDS.labels(kind).observe(time.perf_counter() - t_start)

    def _leave(self, m: _Member) -> None:
        with self.admission._cond:
            m.done = True
            m.rows.clear()

    def _drain(self, m: _Member, *, wait: bool) -> Iterator[Any]:
        """``m``'s delivered items (raising a delivered error); with ``wait``, until it has all its images."""
        cond = self.admission._cond
        while True:
            with cond:
                while wait and not m.items and not m.done:
                    err = m.gone()
                    if err is not None:
                        m.done = True  # its rows are dropped from later calls; a running call's row is thrown away
                        m.rows.clear()
                        m.items.append(err)
                        break
                    cond.wait(timeout=1.0)  # a delivery or a cancel callback notifies
                if not m.items:
                    return
                item = m.items.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if not wait and not m.items:
                return
