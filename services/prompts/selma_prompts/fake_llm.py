"""A scripted OpenAI-compatible server (stdlib only) for tests, demos and trying the service offline.

It answers ``POST /v1/completions`` and ``POST /v1/chat/completions`` with a numbered list
that continues the one in the prompt.  By default the list is made deterministically from
the request (a hash of the prompt and its ``seed``), so a client that sends the same requests
gets the same answers in any process; a few items repeat an in-context example, as real
LLMs do, to exercise the diversity filter.  Tests script faults with ``fail_next`` (HTTP
errors or garbage), ``gate`` (hold requests until released) and read back ``requests``.

Run one for a demo: ``python -m selma_prompts.fake_llm --port 8089`` then point the
openai_compatible backend at ``http://127.0.0.1:8089/v1``.  It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ADJ = "red small wooden striped shiny old tall round fluffy rusty green golden tiny broken bright".split()
_NOUN = (
    "cat bicycle teapot umbrella lamp guitar suitcase pumpkin kite robot owl ladder sofa anchor violin "
    "cactus bucket helmet lantern canoe parrot clock mirror basket tractor"
).split()
_PLACE = (
    "on a beach|in a kitchen|under a bridge|on a snowy hill|in a library|next to a fountain|on a rooftop|"
    "in a garden|at a train station|inside a barn|on a wooden dock|in a desert"
).split("|")
_NUM = "one two three".split()

Responder = Callable[[str, dict[str, Any]], tuple[int, Any]]


def first_number(body: dict[str, Any]) -> tuple[int, int, list[str]]:
    """(first item number to write, how many, the in-context examples) parsed from a request body."""
    text = body.get("prompt") or "\n".join(m.get("content", "") for m in body.get("messages", []))
    examples = re.findall(r"^(\d+)\. (.+)$", text.split("Image descriptions written this way:")[-1], flags=re.M)
    m = re.search(r"numbered (\d+) to (\d+)", text)
    if m:
        start, end = int(m.group(1)), int(m.group(2))
    else:
        start = int(re.search(r"\n(\d+)\.$", text).group(1)) if re.search(r"\n(\d+)\.$", text) else len(examples) + 1
        n = re.search(r"Write (\d+) new", text)
        end = start + (int(n.group(1)) if n else 5) - 1
    return start, end - start + 1, [e[1] for e in examples if int(e[0]) < start]


def synthetic_list(body: dict[str, Any], *, repeat_rate: float = 0.1) -> str:
    """A deterministic numbered continuation for ``body`` (a function of the request only)."""
    start, n, examples = first_number(body)
    key = json.dumps([body.get("prompt"), body.get("messages"), body.get("seed")], sort_keys=True)
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
    items = []
    for _ in range(n):
        if examples and rng.random() < repeat_rate:
            items.append(rng.choice(examples))
        else:
            items.append(
                f"{rng.choice(_NUM).capitalize()} {rng.choice(_ADJ)} {rng.choice(_NOUN)}s and a {rng.choice(_ADJ)} "
                f"{rng.choice(_NOUN)} {rng.choice(_PLACE)}."
            )
    completions = "prompt" in body
    lines = [f"{start + i}. {t}" for i, t in enumerate(items)]
    if completions:
        lines[0] = " " + items[0]  # the prompt ends with "4.", so the completion starts mid-item
    return "\n".join(lines) + "\n"


class FakeLlmServer:
    """The server; use as a context manager or call ``start``/``stop``."""

    def __init__(self, responder: Responder | None = None, *, port: int = 0) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_next: list[tuple[int, Any]] = []  # (status, body) served before normal answers
        self.gate: threading.Event | None = None  # when set to an unset Event, requests wait for it
        self.gate_after: int = 0  # ...but only after this many requests were answered
        self.gate_reached = threading.Event()
        self._lock = threading.Lock()
        self._answered = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                status, payload = server._handle(self.path, body, dict(self.headers))
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval makes stop() quick.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-llm", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeLlmServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeLlmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            gate = self.gate if self.gate is not None and self._answered >= self.gate_after else None
            if gate is not None:
                self.gate_reached.set()
        if gate is not None:
            gate.wait()
        with self._lock:
            if self.fail_next:
                return self.fail_next.pop(0)
            self._answered += 1
        if not path.endswith(("/completions", "/chat/completions")):
            return 404, {"error": {"message": f"no route {path}"}}
        if self.responder is not None:
            return self.responder(path, body)
        return 200, openai_answer(path, synthetic_list(body))

    @property
    def answered(self) -> int:
        with self._lock:
            return self._answered


def openai_answer(path: str, text: str, finish_reason: str = "stop") -> dict[str, Any]:
    """An OpenAI-style response body carrying ``text``."""
    usage = {"prompt_tokens": 100, "completion_tokens": max(1, len(text.split())), "total_tokens": 100 + len(text.split())}
    if path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "choices": [choice], "usage": usage}
    return {"id": "cmpl-fake", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}], "usage": usage}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8089)
    args = p.parse_args(argv)
    server = FakeLlmServer(port=args.port).start()
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
