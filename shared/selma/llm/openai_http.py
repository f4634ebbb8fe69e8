"""The one OpenAI-compatible HTTP client (vLLM, TGI, Ollama, OpenAI), for prompt generation and vision VQA alike.

Failures: transport errors, timeouts, HTTP 429/5xx and unparseable bodies are retried with
exponential backoff (honouring ``Retry-After``, capped) up to ``max_retries`` times, then the
round fails with :class:`~selma.llm.backend.LlmUnavailable` (gRPC UNAVAILABLE).  401/403 is
PERMISSION_DENIED and other 4xx INVALID_ARGUMENT at once, since retrying cannot fix them.  The API
key is sent only in the ``Authorization`` header and never logged or put in an error message.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

import selma
from selma.errors import InvalidArgument, PermissionDenied, Unavailable
from selma.llm import metrics
from selma.llm.backend import (
    BackendSpec,
    LlmBackend,
    LlmRequest,
    LlmResponse,
    LlmUnavailable,
    RetryableError,
    Sampling,
)
from selma.specs import parse_duration, parse_int, parse_mapping, parse_str

log = logging.getLogger(__name__)
T = TypeVar("T")

_BODY_EXCERPT = 300
# Keys of extra_body that would smuggle credentials or replace what the caller controls.
FORBIDDEN_EXTRA_FIELDS = re.compile(r"(api[-_]?key|authori[sz]ation|secret|password|bearer|^token$|access[-_]?token|^headers?$)", re.I)
RESERVED_EXTRA_FIELDS = {"model", "prompt", "messages", "n", "stream"}


class OpenAiHttp:
    """One OpenAI-compatible endpoint: JSON POSTs, run concurrently, each with bounded retries.

    Transport errors, timeouts, HTTP 429/5xx and bodies ``parse`` cannot use (it raises
    :class:`RetryableError`) are retried with exponential backoff (honouring ``Retry-After``,
    capped) up to ``max_retries`` times, then ``unavailable`` is raised naming the endpoint and the
    last error; 401/403 is PermissionDenied and other 4xx InvalidArgument at once.  The first
    failure of a batch stops the requests not yet sent.  Redirects are not followed, so the
    ``Authorization`` header never goes elsewhere; the key is never logged.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: SecretStr | None,
        *,
        request_timeout: float,
        max_concurrency: int,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        endpoint: str = "LLM endpoint",
        request_noun: str = "request",
        field: str = "spec.backend.openai_compatible",
        hint_4xx: str = "check base_url (up to and including /v1), model and extra_body",
        resume_hint: str = "",
        unavailable: type[Unavailable] = LlmUnavailable,
        metrics_kind: str | None = None,
        user_agent: str = "selma",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._endpoint, self._noun, self._field, self._hint_4xx, self._resume = endpoint, request_noun, field, hint_4xx, resume_hint
        self._unavailable = unavailable
        self._kind = metrics_kind
        headers = {"User-Agent": f"{user_agent}/{selma.__version__}", "Content-Type": "application/json"}
        if api_key is not None and api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
            follow_redirects=False,  # a redirect must not carry the Authorization header elsewhere
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openai-http")
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()  # wakes requests sleeping in a backoff
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._client.close()

    def post_all(
        self, path: str, bodies: Sequence[tuple[int, dict[str, Any]]], parse: Callable[[Any, httpx.Response], T], *, cancel: threading.Event | None = None
    ) -> list[tuple[T, int]]:
        """POST each ``(index, body)`` to ``{base_url}/{path}`` concurrently; ``(parse(json, response), retries)`` in order."""
        abort = threading.Event()
        futures = [self._pool.submit(self._call, index, f"{self.base_url}/{path}", body, parse, cancel, abort) for index, body in bodies]
        results: list[tuple[T, int]] = []
        first_error: BaseException | None = None
        for f in futures:  # in submission order, whatever order the responses arrive in
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - the first is re-raised below
                abort.set()
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return results

    def _call(self, index: int, url: str, body: dict[str, Any], parse: Callable[[Any, httpx.Response], T],
              cancel: threading.Event | None, abort: threading.Event) -> tuple[T, int]:
        if abort.is_set():
            raise self._unavailable(f"{self._noun} {index} not sent: an earlier one of the batch failed")
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            t0 = time.perf_counter()
            try:
                out = self._parse(self._client.post(url, json=body), url, parse)
            except RetryableError as e:
                self._observe(t0, e.error_class)
                last, retry_after = str(e), e.retry_after
            except httpx.TimeoutException:
                self._observe(None, "timeout")
                last, retry_after = f"timed out after {self.request_timeout:g} s", None
            except httpx.TransportError as e:
                if self._closed.is_set():
                    break
                self._observe(None, "connect")
                last, retry_after = f"cannot reach the endpoint ({type(e).__name__}: {e})", None
            else:
                self._observe(t0, None)
                return out, attempt
            if attempt + 1 >= attempts or abort.is_set():
                break
            delay = min(self._max_backoff, self._backoff * 2**attempt)
            if retry_after is not None:
                delay = min(self._max_backoff, max(delay, retry_after))
            log.warning("%s %d attempt %d/%d failed: %s; retrying in %.2f s", self._noun, index, attempt + 1, attempts, last, delay)
            if self._kind is not None:
                metrics.LLM_RETRIES.labels(self._kind).inc()
            if self._sleep(delay, cancel) or abort.is_set():
                break
        err = self._unavailable(
            f"the {self._endpoint} {self.base_url} (model {self.model!r}) failed {self._noun} {index} "
            f"{attempts} time(s); last error: {last or 'closed'}." + (f" {self._resume}" if self._resume else "")
        )
        err.retries = attempts - 1  # type: ignore[attr-defined]
        raise err

    def _sleep(self, delay: float, cancel: threading.Event | None) -> bool:
        """Sleep the backoff; True (at once) when cancelled or closed."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if (cancel is not None and cancel.wait(min(left, 0.05))) or self._closed.is_set():
                return True
            if cancel is None and self._closed.wait(min(left, 0.05)):
                return True
        return False

    def _observe(self, t0: float | None, error: str | None) -> None:
        if self._kind is None:
            return
        if t0 is not None:
            metrics.LLM_REQUEST_SECONDS.labels(self._kind).observe(time.perf_counter() - t0)
        if error is not None:
            metrics.LLM_ERRORS.labels(self._kind, error).inc()

    def _parse(self, resp: httpx.Response, url: str, parse: Callable[[Any, httpx.Response], T]) -> T:
        status = resp.status_code
        if status == 429 or status >= 500:
            raise RetryableError(f"http_{'429' if status == 429 else '5xx'}", f"HTTP {status}: {response_excerpt(resp)}", retry_after_seconds(resp))
        if status in (401, 403):
            self._observe(None, "http_4xx")
            raise PermissionDenied(
                f"the {self._endpoint} {self.base_url} refused the credential (HTTP {status}); check the api_key secret",
                field=f"{self._field}.api_key",
            )
        if status >= 400:
            self._observe(None, "http_4xx")
            raise InvalidArgument(
                f"the {self._endpoint} rejected the request (HTTP {status} from {url}): {response_excerpt(resp)}; {self._hint_4xx}",
                field=self._field,
            )
        if status != 200:
            raise RetryableError("invalid_response", f"unexpected HTTP {status}")
        try:
            return parse(resp.json(), resp)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RetryableError("invalid_response", f"unusable response body ({type(e).__name__}): {response_excerpt(resp)}") from None


class OpenAICompatibleBackend(LlmBackend):
    """``POST {base_url}/completions`` or ``{base_url}/chat/completions`` (vLLM, TGI, Ollama, OpenAI)."""

    kind = "openai_compatible"

    def __init__(
        self,
        spec: BackendSpec,
        api_key: SecretStr | None,
        *,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.spec = spec
        self.model_name = spec.model
        self.round_size = spec.max_concurrency
        self._path = "completions" if spec.api == "completions" else "chat/completions"
        self._http = OpenAiHttp(
            spec.base_url, spec.model, api_key, request_timeout=spec.request_timeout, max_concurrency=spec.max_concurrency,
            max_retries=spec.max_retries, backoff=backoff, max_backoff=max_backoff, metrics_kind=self.kind,
            user_agent="selma-llm", transport=transport,
            resume_hint="Prompts accepted so far are kept: fix the endpoint and start the job again with the same idempotency key to resume",
        )

    def close(self) -> None:
        self._http.close()

    def body(self, req: LlmRequest) -> dict[str, Any]:
        """The JSON body for one request (public for tests and debugging; holds no credential)."""
        s: Sampling = self.spec.sampling
        body: dict[str, Any] = {"model": self.spec.model}
        if self.spec.api == "completions":
            body["prompt"] = req.completion_prompt
        else:
            body["messages"] = [{"role": "system", "content": req.system}, {"role": "user", "content": req.user}]
        body.update({"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": 1, "seed": req.seed})
        if s.stop:
            body["stop"] = list(s.stop)
        for k, v in self.spec.extra_body.items():
            body.setdefault(k, v)
        return body

    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        results = self._http.post_all(self._path, [(r.index, self.body(r)) for r in requests], self._response, cancel=cancel)
        out = []
        for response, retries in results:
            response.retries = retries
            out.append(response)
        return out

    def _response(self, data: Any, _resp: httpx.Response) -> LlmResponse:
        choice = data["choices"][0]
        text = choice["text"] if self.spec.api == "completions" else choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        usage = data.get("usage") or {}
        out = LlmResponse(
            text=text,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            starts_mid_item=self.spec.api == "completions",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        metrics.LLM_TOKENS.labels(self.kind, "prompt").inc(out.prompt_tokens)
        metrics.LLM_TOKENS.labels(self.kind, "completion").inc(out.completion_tokens)
        return out


def response_excerpt(resp: httpx.Response) -> str:
    try:
        text = resp.text
    except UnicodeDecodeError:
        return f"<{len(resp.content)} bytes>"
    text = " ".join(text.split())
    return text[:_BODY_EXCERPT] + ("…" if len(text) > _BODY_EXCERPT else "") or "<empty body>"


def retry_after_seconds(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def checked_credential(base_url: str, configured: Sequence[str], resolve_key: Callable[[], Any], *, allow_any: bool,
                       prefix: str, what: str, field: str) -> Any:
    """The endpoint rules of an OpenAI-compatible backend a request names, then its credential.

    ``base_url`` must be one of ``configured`` (the service default and ``SELMA_<prefix>_ALLOWED_BASE_URLS``)
    unless ``allow_any``: a caller must not make the service call an address of its choosing.  The
    credential is resolved now (``resolve_key``), so a misnamed secret fails the request, not the job
    later; a configured key only ever goes to a configured endpoint.  PERMISSION_DENIED names ``field``.
    """
    allowed = base_url.rstrip("/") in {u.rstrip("/") for u in configured if u}
    if not allow_any and not allowed:
        raise PermissionDenied(
            f"the service only calls configured {what} endpoints; {base_url!r} is not one (the operator adds it to "
            f"SELMA_{prefix}_ALLOWED_BASE_URLS, or sets SELMA_{prefix}_ALLOW_ANY_BASE_URL=true on a single-user install)",
            field=field,
        )
    credential = resolve_key()
    if credential is not None and not allowed:
        raise PermissionDenied(
            f"the service only sends API keys to configured endpoints; {base_url!r} is not one "
            f"(add it to SELMA_{prefix}_ALLOWED_BASE_URLS, or call it without an api_key)",
            field=field,
        )
    return credential


def parse_base_url(body: Mapping[str, Any], fld: str, default: str, setting: str) -> str:
    """An OpenAI-compatible ``base_url`` (or the service default named ``setting``): http(s), no credentials."""
    base_url = (parse_str(body.get("base_url"), f"{fld}.base_url") or default).rstrip("/")
    if not base_url:
        raise InvalidArgument(
            f"base_url is required (e.g. http://vllm.llm.svc:8000/v1): the service has no default ({setting})",
            field=f"{fld}.base_url",
        )
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise InvalidArgument(f"base_url must be an http(s) URL up to and including /v1; got {base_url!r}", field=f"{fld}.base_url")
    if "@" in base_url.split("/")[2]:
        raise InvalidArgument("base_url must not carry credentials; name an api_key secret instead", field=f"{fld}.base_url")
    return base_url


def parse_transport(body: Mapping[str, Any], fld: str, *, default_retries: int) -> tuple[float | None, int, int, dict[str, Any]]:
    """(request_timeout or None, max_concurrency (0 = default), max_retries, extra_body) of an OpenAI-compatible backend."""
    timeout = parse_duration(body.get("request_timeout"), f"{fld}.request_timeout")
    if timeout is not None and not 0 < timeout <= 3600:
        raise InvalidArgument(f"request_timeout must be in (0, 3600] seconds; got {timeout}", field=f"{fld}.request_timeout")
    concurrency = parse_int(body.get("max_concurrency"), f"{fld}.max_concurrency")
    if not 0 <= concurrency <= 64:
        raise InvalidArgument(f"max_concurrency must be in 1..64 (0 = default); got {concurrency}", field=f"{fld}.max_concurrency")
    retries = parse_int(body.get("max_retries"), f"{fld}.max_retries", default_retries)
    if not 0 <= retries <= 10:
        raise InvalidArgument(f"max_retries must be in 0..10; got {retries}", field=f"{fld}.max_retries")
    extra = parse_mapping(body.get("extra_body"), f"{fld}.extra_body")
    for k in extra:
        if FORBIDDEN_EXTRA_FIELDS.search(k):
            raise InvalidArgument(f"extra_body must not carry credentials ({k!r}); name an api_key secret instead", field=f"{fld}.extra_body")
        if k in RESERVED_EXTRA_FIELDS:
            raise InvalidArgument(f"extra_body cannot set {k!r}: the service controls it", field=f"{fld}.extra_body")
    return timeout, concurrency, retries, dict(extra)
