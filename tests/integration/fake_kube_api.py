"""A loopback fake of the Kubernetes API for ``batch/v1`` Jobs (tests only).

Stdlib ``ThreadingHTTPServer`` on 127.0.0.1:0, driven by the real ``kubernetes`` client
(``Configuration.host = server.url``).  It serves
``/apis/batch/v1/namespaces/{ns}/jobs[/{name}[/status]]``: POST (201, 409 AlreadyExists, 422
for a restartPolicy other than Never/OnFailure), GET, list with ``labelSelector`` and
``limit``, PATCH (merge patch, including ``/status``), DELETE (returns a Status) and
``?watch=true`` (chunked JSON lines; honours ``resourceVersion`` and ``timeoutSeconds``;
``410 Gone`` as an ERROR event for a resourceVersion older than the kept history, or for the
next ``expire_watches`` watches), and core ``/api/v1/namespaces/{ns}/services[/{name}]``: POST
(201, 409), GET and DELETE (the rendezvous Services of distributed training Jobs).  Errors are
``kind: Status`` objects so ``ApiException.status``/``reason`` are real.  The test plays the
Job controller with :meth:`FakeKubeApi.set_job_status`; ``forbid = True`` answers 403 to all.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

_PREFIX = "/apis/batch/v1/namespaces/"
_CORE_PREFIX = "/api/v1/namespaces/"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


def _merge(dst: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif labels.get(term) is None:
            return False
    return True


class FakeKubeApi:
    """The fake API's state plus its HTTP server; use as a context manager."""

    def __init__(self, history: int = 1000) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.rv = 100
        self.history = history
        self.cond = threading.Condition()
        self.forbid = False
        self.expire_watches = 0  # the next N watch requests get a 410 Expired ERROR event
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> dict[str, Any]:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""  # always drained, or keep-alive breaks
                return json.loads(raw) if raw else {}

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                body = self._body() if method in ("POST", "PATCH", "PUT", "DELETE") else {}
                with api.cond:
                    api.requests.append((method, url.path))
                if api.forbid:
                    return self._send(403, _status(403, "Forbidden", 'jobs.batch is forbidden: User "system:serviceaccount:selma:selma-training" cannot create resource "jobs"'))
                if url.path.startswith(_CORE_PREFIX):
                    return self._service(method, url.path[len(_CORE_PREFIX):].split("/"), body)
                if not url.path.startswith(_PREFIX):
                    return self._send(404, _status(404, "NotFound", f"the server could not find the requested resource {url.path}"))
                parts = url.path[len(_PREFIX):].split("/")
                if len(parts) < 2 or parts[1] != "jobs":
                    return self._send(404, _status(404, "NotFound", "not found"))
                ns, name = parts[0], (parts[2] if len(parts) > 2 else "")
                sub = parts[3] if len(parts) > 3 else ""
                if method == "GET" and not name:
                    if query.get("watch") in ("true", "1"):
                        return self._watch(ns, query)
                    return self._send(200, api.list(ns, query.get("labelSelector", ""), int(query.get("limit", 0) or 0)))
                if method == "POST" and not name:
                    code, obj = api.create(ns, body)
                    return self._send(code, obj)
                if method == "GET":
                    obj = api.jobs.get((ns, name))
                    return self._send(200, obj) if obj else self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
                if method == "PATCH":
                    code, obj = api.patch(ns, name, body, status=sub == "status")
                    return self._send(code, obj)
                if method == "DELETE":
                    code, obj = api.delete(ns, name)
                    return self._send(code, obj)
                return self._send(405, _status(405, "MethodNotAllowed", method))

            def _service(self, method: str, parts: list[str], body: dict[str, Any]) -> None:
                if len(parts) < 2 or parts[1] != "services":
                    return self._send(404, _status(404, "NotFound", "not found"))
                ns, name = parts[0], (parts[2] if len(parts) > 2 else "")
                with api.cond:
                    if method == "POST" and not name:
                        name = (body.get("metadata") or {}).get("name", "")
                        if (ns, name) in api.services:
                            return self._send(409, _status(409, "AlreadyExists", f'services "{name}" already exists'))
                        obj = json.loads(json.dumps(body))
                        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()))
                        api.services[(ns, name)] = obj
                        api.cond.notify_all()
                        return self._send(201, obj)
                    obj = api.services.get((ns, name))
                    if obj is None:
                        return self._send(404, _status(404, "NotFound", f'services "{name}" not found'))
                    if method == "GET":
                        return self._send(200, obj)
                    if method == "DELETE":
                        del api.services[(ns, name)]
                        api.cond.notify_all()
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
                return self._send(405, _status(405, "MethodNotAllowed", method))

            def _watch(self, ns: str, query: dict[str, str]) -> None:
                selector = query.get("labelSelector", "")
                timeout = float(query.get("timeoutSeconds", 30))
                since = int(query.get("resourceVersion") or 0)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def emit(obj: dict[str, Any]) -> None:
                    data = json.dumps(obj).encode() + b"\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                deadline = time.monotonic() + timeout
                try:
                    with api.cond:
                        expire = api.expire_watches > 0
                        api.expire_watches -= int(expire)
                        if expire:
                            pending = [("ERROR", _status(410, "Expired", f"too old resource version: {since}"))]
                        elif since == 0:
                            pending = [("ADDED", o) for (n, _), o in sorted(api.jobs.items()) if n == ns and _matches(o, selector)]
                            since = api.rv
                        elif api.events and since < api.events[0][0] - 1:
                            pending = [("ERROR", _status(410, "Expired", f"too old resource version: {since}"))]
                        else:
                            pending = []
                    while True:
                        for kind, obj in pending:
                            emit({"type": kind, "object": obj})
                            if kind == "ERROR":
                                raise StopIteration
                        with api.cond:
                            pending = [(k, o) for rv, k, o in api.events if rv > since and o["metadata"]["namespace"] == ns and _matches(o, selector)]
                            if pending:
                                since = api.events[-1][0]
                                continue
                            left = deadline - time.monotonic()
                            if left <= 0:
                                break
                            api.cond.wait(left)
                except (StopIteration, BrokenPipeError, ConnectionResetError):
                    pass
                try:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._route("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._route("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._route("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-kube-api", daemon=True)

    # -- lifecycle

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- state changes (all under the condition)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, json.loads(json.dumps(obj))))
        del self.events[: -self.history]
        self.cond.notify_all()

    def list(self, ns: str, selector: str, limit: int = 0) -> dict[str, Any]:
        with self.cond:
            items = [o for (n, _), o in sorted(self.jobs.items()) if n == ns and _matches(o, selector)]
            return {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items[:limit] if limit else items}

    def create(self, ns: str, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = (obj.get("metadata") or {}).get("name", "")
        policy = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            return 422, _status(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"')
        with self.cond:
            if (ns, name) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            obj = json.loads(json.dumps(obj))
            md = obj.setdefault("metadata", {})
            md.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            obj.setdefault("status", {})
            self.jobs[(ns, name)] = obj
            self._event("ADDED", obj)
            return 201, obj

    def patch(self, ns: str, name: str, body: dict[str, Any], *, status: bool = False) -> tuple[int, dict[str, Any]]:
        with self.cond:
            obj = self.jobs.get((ns, name))
            if obj is None:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            _merge(obj, {"status": body.get("status", {})} if status else body)
            self._event("MODIFIED", obj)
            return 200, obj

    def delete(self, ns: str, name: str) -> tuple[int, dict[str, Any]]:
        with self.cond:
            obj = self.jobs.pop((ns, name), None)
            if obj is None:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            self._event("DELETED", obj)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "batch", "kind": "jobs", "uid": obj["metadata"]["uid"]}}

    # -- the test plays the Job controller

    def set_job_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        """Replace a Job's status (e.g. {"active": 1} or a Complete/Failed condition) and emit MODIFIED."""
        with self.cond:
            obj = self.jobs[(ns, name)]
            obj["status"] = status
            self._event("MODIFIED", obj)

    def wait_for_job(self, ns: str, selector: str = "", timeout: float = 30.0) -> dict[str, Any]:
        """Block until a Job matching ``selector`` exists in ``ns``; returns it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for (n, _), o in self.jobs.items():
                    if n == ns and _matches(o, selector):
                        return o
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no Job matching {selector!r} in {ns} within {timeout} s")
                self.cond.wait(left)

    def wait_until(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        """Block until ``predicate(self)`` holds (checked at every change of jobs or services)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: not within {timeout} s")
                self.cond.wait(left)

    def count(self, method: str) -> int:
        with self.cond:
            return sum(1 for m, p in self.requests if m == method and p.endswith("/jobs"))


def complete(succeeded: bool = True) -> dict[str, Any]:
    """A terminal Job status as the controller writes it."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if succeeded:
        return {"succeeded": 1, "completionTime": now, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
            {"type": "Complete", "status": "True", "lastTransitionTime": now}]}
    return {"failed": 4, "conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": now},
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": now}]}
