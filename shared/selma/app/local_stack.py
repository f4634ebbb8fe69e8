"""``selma up``: the four services on localhost with embedded defaults, supervised.

Each service runs as its own process (``selma serve NAME``), exactly as in a pod, with
settings passed as ``SELMA_*`` variables: ``file://`` storage under the data directory (or
``--storage s3://…``), the local training launcher (or ``--launcher kubernetes``), tiny
offline models and the bundled small LLM.  ``selma up`` waits until every health check
reports SERVING, prints the endpoints (gRPC as ``127.0.0.1:PORT``, metrics as
``http://127.0.0.1:PORT/metrics``), writes them to ``<data_dir>/endpoints.json`` for
``selma run``/``selma generate``, and on Ctrl-C (or SIGTERM) drains and stops every
service by PID.

``selma up --tls`` turns on transport security and auth (:mod:`selma.app.local_tls`): a local CA
and server certificate under ``<dir>/tls/``, fresh tokens (the admin one in ``<dir>/token``, 0600),
and an endpoints file naming the CA and token file, so CLI commands on that directory use them.

While it runs, ``selma up`` supervises (:meth:`LocalStack.supervise`): a service that exits is
started again on the same ports after a bounded exponential back-off (so the endpoints file stays
valid and a running ``selma run`` reconnects), the others keep running; a service that fails
``max_failures`` times within ``window`` seconds stops the whole stack with an error naming it and
the end of its log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma.app.runner import pid_alive
from selma.client import SERVICE_NAMES, SERVICES, Endpoints
from selma.errors import Aborted, FailedPrecondition, Unavailable
from selma.routing import SEPARATOR
from selma.security import ClientSecurity
from selma.server import wait_for_serving
from selma.storage import require_s3_endpoint

log = logging.getLogger(__name__)

# Settings each service gets in the local stack (on top of the shared ones), as SELMA_* names.
# They select the embedded defaults: tiny offline models, the bundled LLM, the local launcher.
EMBEDDED_DEFAULTS: dict[str, dict[str, str]] = {
    # A single user's loopback stack may call any LLM/VQA endpoint the user names (the chart keeps the allow-list).
    "prompts": {"SELMA_LLM_DEFAULT_BACKEND": "embedded", "SELMA_LLM_ALLOW_ANY_BASE_URL": "true"},
    "render": {"SELMA_RENDER_DEFAULT_MODEL": "tiny://sd"},
    # training hosts the EvaluationService (VQA endpoints; the LLM that writes its questions)
    "training": {"SELMA_BATCH_LAUNCHER": "local", "SELMA_TRAINING_DEFAULT_MODEL": "tiny://sd",
                 "SELMA_EVAL_ALLOW_ANY_BASE_URL": "true", "SELMA_LLM_ALLOW_ANY_BASE_URL": "true"},
    "serving": {"SELMA_SERVING_BASE_MODEL": "tiny://sd"},
}


def _local_model_dir(source: str) -> Path | None:
    """The directory ``source`` loads from when it is a local path or a plugin's scheme; None for hub ids, tiny://, s3://."""
    from selma import plugins
    from selma.errors import SelmaError

    if not source or source.startswith(("tiny://", "s3://")):
        return None
    resolver = plugins.registry().model_scheme(source)
    if resolver is not None:
        try:
            return Path(resolver(source)).resolve()
        except SelmaError:
            return None  # the service reports it when it loads the model
    path = Path(source.removeprefix("file://")).expanduser()
    return path.resolve() if path.is_absolute() or source.startswith(".") else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


LOCK_FILE = "up.lock"


class StackLock:
    """One ``selma up`` per data directory: ``<dir>/up.lock`` holds the owner's PID and its endpoints.

    Taken by an atomic ``link`` of a fully written file (so a reader never sees half a lock); a lock
    whose PID is dead is stale and taken over (with a log line); a live one is refused with an
    :class:`Aborted` naming the PID and the endpoints it serves.  Only the owner removes it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self.held = False

    def read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_new(self, payload: dict) -> bool:
        """Create the lock file with ``payload``; False if it exists already."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._write_new({"pid": os.getpid(), "endpoints": None}):
                self.held = True
                return
            data = self.read()
            if data is None:
                continue  # released between our attempt and the read
            pid = data.get("pid") if isinstance(data.get("pid"), int) else 0
            if pid and pid_alive(pid):
                raise Aborted(f"{self.path.parent} is already served by `selma up` (pid {pid}; {_describe(data.get('endpoints'))}); "
                              f"use that stack, stop it first (Ctrl-C there, or kill {pid}), or pass another --dir", field="dir")
            log.warning("taking over the stale lock %s of `selma up` pid %s, which is no longer running", self.path, pid or "?")
            self.path.unlink(missing_ok=True)
        raise Aborted(f"could not take the lock {self.path}; another `selma up` is starting in {self.path.parent}", field="dir")

    def record(self, endpoints: Endpoints) -> None:
        """Write the endpoints we serve into our lock, so a refused second `selma up` can name them."""
        if not self.held:
            return
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "endpoints": {n: getattr(endpoints, n) for n in SERVICES}}))
        tmp.replace(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        data = self.read()
        if data is not None and data.get("pid") == os.getpid():  # only ever remove our own lock
            self.path.unlink(missing_ok=True)


def _describe(endpoints: object) -> str:
    if not isinstance(endpoints, dict) or not endpoints:
        return "still starting, no endpoints yet"
    return "serving " + ", ".join(f"{k} {v}" for k, v in endpoints.items())


def service_of(name: str) -> str:
    """The service a process runs: ``serving-2`` (a second serving replica) runs ``serving``."""
    return name.partition("-")[0]


@dataclass
class ServiceProcess:
    name: str  # the service, or <service>-<n> for its n-th replica (n >= 2)
    grpc_port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass(frozen=True)
class RestartPolicy:
    """How ``selma up`` restarts a service that exited: bounded exponential back-off, bounded failures."""

    max_failures: int = 5  # this many exits within ``window`` seconds: give up and stop the stack
    window: float = 300.0
    initial_backoff: float = 1.0  # before the first restart; doubles with each failure in the window
    max_backoff: float = 30.0
    start_timeout: float = 300.0  # a restarted service not SERVING by then counts as a failure

    def backoff(self, failures: int) -> float:
        """The wait before restarting after the ``failures``-th failure in the window (1-based)."""
        return min(self.initial_backoff * 2.0 ** min(max(failures - 1, 0), 60), self.max_backoff)


@dataclass
class _Supervised:
    """The supervisor's view of one service: its recent failures and what it is waiting for."""

    failures: list[float] = field(default_factory=list)  # monotonic times of exits within the window
    restart_at: float | None = None  # waiting out the back-off until then
    starting_until: float | None = None  # restarted; must be SERVING by then
    last_exit: str = ""


def log_tail(path: Path, lines: int = 20, chars: int = 600) -> str:
    """The last ``lines`` lines of a log file, at most ``chars`` characters of them ('' if it cannot be read).

    Whole lines from the end: the last one (a traceback's exception line) is what says why, and an
    error message quoting the tail must stay within selma.errors' message bound without losing it."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    kept: list[str] = []
    for line in reversed(tail):
        if kept and sum(len(x) + 1 for x in kept) + len(line) > chars:
            break
        kept.append(line[-chars:])
    return "\n".join(reversed(kept))


@dataclass
class LocalStack:
    """Starts, watches and stops the four service processes."""

    data_dir: Path
    storage_uri: str = ""
    launcher: str = "local"
    extra_env: dict[str, str] = field(default_factory=dict)
    base_model: str = ""  # "" = the embedded tiny://sd
    allow_model_dirs: tuple[str, ...] = ()  # directories requests may name local model/data sources in (SELMA_MODEL_ALLOWED_DIRS)
    services: tuple[str, ...] = SERVICES
    serving_replicas: int = 1  # serving processes (selma up --serving-replicas); clients route over all of them
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    lock: StackLock | None = field(default=None, repr=False)
    tls: bool = False  # TLS + tokens (selma up --tls); credentials are made by start()
    credentials: Any = field(default=None, repr=False)  # selma.app.local_tls.LocalCredentials when tls
    _endpoints_written: str = field(default="", repr=False)  # the endpoints.json we wrote; the only one stop() removes

    def env_for(self, name: str, grpc_port: int, metrics_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
        env.update(
            {
                "SELMA_HOST": "127.0.0.1",
                "SELMA_GRPC_PORT": str(grpc_port),
                "SELMA_METRICS_PORT": str(metrics_port),
                "SELMA_DATA_DIR": str(self.data_dir),
                "SELMA_STORAGE_URI": self.storage_uri or (self.data_dir / "storage").as_uri(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(EMBEDDED_DEFAULTS.get(service_of(name), {}))
        if self.base_model:
            env.update({"SELMA_RENDER_DEFAULT_MODEL": self.base_model, "SELMA_TRAINING_DEFAULT_MODEL": self.base_model,
                        "SELMA_SERVING_BASE_MODEL": self.base_model})
        # The caller's own SELMA_* settings (S3 endpoint, credentials, a model of their choice) win over the defaults.
        env.update({k: v for k, v in os.environ.items() if k.startswith("SELMA_") and k not in ("SELMA_GRPC_PORT", "SELMA_METRICS_PORT", "SELMA_HOST", "SELMA_ENDPOINTS")})
        if service_of(name) == "training":
            env["SELMA_BATCH_LAUNCHER"] = self.launcher
        if self.credentials is not None:
            env.pop("SELMA_TOKEN", None)  # the services call each other with their own token (SELMA_TOKEN_FILE)
            env.update(self.credentials.server_env())
        env.update(self.extra_env)
        allowed = self.allowed_model_dirs(os.environ.get("SELMA_MODEL_ALLOWED_DIRS", ""), self.extra_env.get("SELMA_MODEL_ALLOWED_DIRS", ""))
        if allowed:
            env["SELMA_MODEL_ALLOWED_DIRS"] = ",".join(allowed)
        return env

    def client_security(self) -> ClientSecurity:
        """How this process reaches its services: the stack's CA and admin token when TLS is on."""
        if self.credentials is None:
            return ClientSecurity()
        return ClientSecurity(token=self.credentials.admin_token, ca_cert=self.credentials.ca_cert)

    def allowed_model_dirs(self, *configured: str) -> list[str]:
        """SELMA_MODEL_ALLOWED_DIRS for the services: the caller's, ``--allow-model-dir`` and the base model's own directory.

        A request may then name the model the stack serves by its path (the ShapesWorld loop does);
        anything else on this machine stays out of reach of requests unless allowlisted.
        """
        dirs = [d.strip() for value in configured for d in value.split(",") if d.strip()]
        dirs += [str(Path(d).expanduser().resolve()) for d in self.allow_model_dirs]
        base = _local_model_dir(self.base_model)
        if base is not None:
            dirs.append(str(base))
        return list(dict.fromkeys(dirs))

    def acquire_lock(self) -> None:
        """Refuse to start a second stack on this data directory (see :class:`StackLock`)."""
        if self.lock is None:
            self.lock = StackLock(self.data_dir)
        self.lock.acquire()

    def check_storage(self) -> None:
        """Fail at once on settings the services would only fail on after minutes of retries."""
        env = self.env_for("training", 0, 0)
        if env["SELMA_STORAGE_URI"].lower().startswith("s3://"):
            require_s3_endpoint(env.get("SELMA_S3_ENDPOINT", ""), env["SELMA_STORAGE_URI"])

    def start(self, timeout: float = 180.0) -> Endpoints:
        self.check_storage()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.acquire_lock()
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.tls and self.credentials is None:
            from selma.app.local_tls import prepare

            self.credentials = prepare(self.data_dir)
        # Ports first: the training service must know serving's addresses (evaluations render through them).
        ports = {name: (free_port(), free_port()) for name in self.process_names()}
        serving = [f"127.0.0.1:{ports[name][0]}" for name in ports if service_of(name) == "serving"]
        if serving:
            self.extra_env.setdefault("SELMA_EVAL_SERVING_ENDPOINT", SEPARATOR.join(serving))
        for name in ports:
            self._spawn(name, *ports[name])
        for name in self.processes:
            self._wait_serving(name, timeout)
        endpoints = self.endpoints()
        endpoints_file = self.data_dir / "endpoints.json"
        endpoints.save(endpoints_file)
        self._endpoints_written = endpoints_file.read_text()
        assert self.lock is not None
        self.lock.record(endpoints)
        return endpoints

    def process_names(self) -> list[str]:
        """The processes to start: each service once, serving ``serving_replicas`` times (serving, serving-2, ...)."""
        out = []
        for name in self.services:
            out.append(name)
            if name == "serving":
                out += [f"serving-{i}" for i in range(2, self.serving_replicas + 1)]
        return out

    def _spawn(self, name: str, grpc_port: int, metrics_port: int) -> ServiceProcess:
        log_path = self.data_dir / "logs" / f"{name}.log"
        out = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "selma.app.cli", "serve", service_of(name)],
            env=self.env_for(name, grpc_port, metrics_port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to `selma up`, which drains the children in order
        )
        out.close()
        sp = self.processes[name] = ServiceProcess(name, grpc_port, metrics_port, proc, log_path)
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return sp

    def restart(self, name: str, timeout: float = 180.0) -> ServiceProcess:
        """Start a stopped service again on its old ports (its jobs resume from storage)."""
        old = self.processes[name]
        if old.proc.poll() is None:
            raise FailedPrecondition(f"the {name} service is still running (pid {old.proc.pid})")
        self._spawn(name, old.grpc_port, old.metrics_port)
        self._wait_serving(name, timeout)
        return self.processes[name]

    def _wait_serving(self, name: str, timeout: float) -> None:
        sp = self.processes[name]
        deadline = time.monotonic() + timeout
        while True:
            if sp.proc.poll() is not None:
                self.stop()
                tail = sp.log_path.read_text(errors="replace")[-2000:]
                raise FailedPrecondition(f"the {name} service exited with code {sp.proc.returncode} while starting; its log ({sp.log_path}) ends with:\n{tail}")
            try:
                wait_for_serving(sp.address, SERVICE_NAMES[service_of(name)], timeout=min(5.0, max(deadline - time.monotonic(), 0.1)),
                                 security=self.client_security())
                return
            except TimeoutError as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(f"the {name} service did not become SERVING within {timeout:.0f} s ({e}); see {sp.log_path}") from None

    def endpoints(self) -> Endpoints:
        creds = self.credentials
        addresses: dict[str, list[str]] = {}
        for name, sp in self.processes.items():
            addresses.setdefault(service_of(name), []).append(sp.address)
        return Endpoints(
            **{service: SEPARATOR.join(a) for service, a in addresses.items()},
            metrics={name: sp.metrics_url for name, sp in self.processes.items()},
            ca_cert=str(creds.ca_cert) if creds else "",
            token_file=str(creds.admin_token_file) if creds else "",
        )

    def supervise(self, stop: threading.Event, policy: RestartPolicy = RestartPolicy(), tick: float = 0.5) -> None:
        """Keep every service up until ``stop`` is set: restart one that exits, on its own ports.

        Returns when ``stop`` is set (the caller stops the stack).  A service that fails
        ``policy.max_failures`` times within ``policy.window`` s stops every service and raises
        :class:`FailedPrecondition` naming it, with the end of its log.
        """
        state = {name: _Supervised() for name in self.processes}
        while not stop.wait(tick):
            now = time.monotonic()
            for name, sp in list(self.processes.items()):
                st = state[name]
                code = sp.proc.poll()
                if st.restart_at is None and code is None and st.starting_until is not None:
                    if self._serving(sp):
                        st.starting_until = None
                        log.warning("the %s service is SERVING again on %s (pid %d)", name, sp.address, sp.proc.pid)
                        continue
                    if now < st.starting_until:
                        continue
                    log.warning("the %s service (pid %d) did not become SERVING within %.0f s; restarting it", name, sp.proc.pid, policy.start_timeout)
                    sp.proc.kill()
                    sp.proc.wait()
                    code = sp.proc.returncode
                    st.last_exit = f"was not SERVING within {policy.start_timeout:.0f} s of a restart"
                elif code is not None and st.restart_at is None:
                    st.last_exit = f"exited with code {code}"
                if st.restart_at is None and code is not None:
                    st.starting_until = None
                    st.failures = [t for t in st.failures if now - t < policy.window] + [now]
                    if len(st.failures) >= policy.max_failures:
                        self.stop()
                        raise FailedPrecondition(
                            f"the {name} service failed {len(st.failures)} times within {policy.window:.0f} s "
                            f"(last: {st.last_exit}); stopped the stack. Its log ({sp.log_path}) ends with:\n{log_tail(sp.log_path)}"
                        )
                    delay = policy.backoff(len(st.failures))
                    st.restart_at = now + delay
                    log.warning("the %s service (pid %d) %s; restarting it on %s in %.1f s (failure %d; the stack stops at %d within %.0f s); log %s",
                                name, sp.proc.pid, st.last_exit, sp.address, delay, len(st.failures), policy.max_failures,
                                policy.window, sp.log_path)
                if st.restart_at is not None and now >= st.restart_at:
                    st.restart_at = None
                    st.starting_until = now + policy.start_timeout
                    self._spawn(name, sp.grpc_port, sp.metrics_port)

    def _serving(self, sp: ServiceProcess) -> bool:
        try:
            wait_for_serving(sp.address, SERVICE_NAMES[service_of(sp.name)], timeout=0.5)
        except TimeoutError:
            return False
        return True

    def poll(self) -> str | None:
        """The name of a service that exited, if any."""
        for name, sp in self.processes.items():
            if sp.proc.poll() is not None:
                return name
        return None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every service (they drain), then SIGKILL what is left after ``grace``."""
        for sp in self.processes.values():
            if sp.proc.poll() is None:
                sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for sp in self.processes.values():
            try:
                sp.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing pid %d", sp.name, grace, sp.proc.pid)
                sp.proc.kill()
                sp.proc.wait()
        endpoints_file = self.data_dir / "endpoints.json"
        try:
            ours = bool(self._endpoints_written) and endpoints_file.read_text() == self._endpoints_written
        except FileNotFoundError:
            ours = False
        if ours:  # only ever remove what this stack wrote
            endpoints_file.unlink(missing_ok=True)
        self._endpoints_written = ""
        if self.lock is not None:
            self.lock.release()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the four services on localhost with embedded defaults")
    p.add_argument("--dir", default=".selma", help="data directory: storage, logs, endpoints.json (default .selma; models live in the shared per-user cache, SELMA_CACHE_DIR)")
    p.add_argument("--storage", default="", help="artifact storage URI (default file://<dir>/storage; s3://bucket/prefix with SELMA_S3_* settings)")
    p.add_argument("--launcher", choices=("local", "kubernetes"), default="local", help="training launcher (default local)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every service to be SERVING")
    p.add_argument("--base-model", default="", help="text-to-image model every service defaults to (default tiny://sd; e.g. shapesworld://base)")
    p.add_argument("--tls", action="store_true", help="TLS with a generated local CA and bearer-token auth; prints an admin and a "
                                                      "generate-only token once and stores the admin one in <dir>/token (mode 0600)")
    p.add_argument("--max-failures", type=int, default=RestartPolicy.max_failures,
                   help=f"a service that exits this many times within --failure-window stops the stack (default {RestartPolicy.max_failures})")
    p.add_argument("--failure-window", type=float, default=RestartPolicy.window,
                   help=f"seconds over which a service's exits are counted (default {RestartPolicy.window:.0f})")
    p.add_argument("--serving-replicas", type=_replicas, default=1, metavar="N",
                   help="serving processes to start (default 1); the endpoints file lists them all (serving: a|b) and "
                        "clients route each model or expert mix to one of them, so their merge caches stay warm")
    p.add_argument("--allow-model-dir", action="append", default=[], metavar="DIR",
                   help="a directory requests may name local models and data in (repeatable; SELMA_MODEL_ALLOWED_DIRS); "
                        "the base model's own directory is always allowed")
    p.set_defaults(func=_up)


def _replicas(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= n <= 16:
        raise argparse.ArgumentTypeError(f"must be 1..16; got {n}")
    return n


def sigterm_interrupts() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does.

    A command that starts its own stack (``selma demo``, ``selma shapesworld table``) stops it in a
    ``finally``; Python's default SIGTERM ends the process without running it, leaving the
    services behind.  Later SIGTERMs are ignored, so stopping the stack is not itself interrupted.
    Main thread only (where signal handlers are set); a no-op elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stack's own stop short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _up(args: argparse.Namespace) -> int:
    stack = LocalStack(Path(args.dir).resolve(), storage_uri=args.storage, launcher=args.launcher, base_model=args.base_model,
                       tls=args.tls, allow_model_dirs=tuple(args.allow_model_dir), serving_replicas=args.serving_replicas)
    stack.check_storage()
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    stack.acquire_lock()  # a second `selma up` on this directory stops here, touching nothing
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from selma.app.models_cli import ensure_smollm2
    from selma.config import SelmaSettings

    # The prompt service loads the embedded LLM before it is SERVING; a first conversion would be minutes of silence.
    ensure_smollm2(SelmaSettings(data_dir=stack.data_dir).resolved_model_cache_dir)
    sys.stdout.write("starting prompts, render, training and serving ...\n")
    sys.stdout.flush()
    try:
        endpoints = stack.start(timeout=args.timeout)
    except BaseException:
        stack.stop()  # what it started, and its lock
        raise
    for name, sp in stack.processes.items():
        label = SERVICE_NAMES[service_of(name)] + (f" ({name})" if name != service_of(name) else "")
        sys.stdout.write(f"{label:<26} grpc {sp.address}  metrics {sp.metrics_url}  (pid {sp.proc.pid})\n")
    sys.stdout.write(f"storage {stack.storage_uri or (stack.data_dir / 'storage').as_uri()}\n")
    sys.stdout.write(f"endpoints written to {stack.data_dir / 'endpoints.json'}; logs in {stack.data_dir / 'logs'}\n")
    creds = stack.credentials
    if creds is not None:
        sys.stdout.write(
            f"TLS and auth on: CA {creds.ca_cert}; CLI commands with --dir {stack.data_dir} use it and the admin token in {creds.admin_token_file}\n"
            f"admin token (shown once; stored mode 0600 in {creds.admin_token_file}): {creds.admin_token}\n"
            f"generate-only token for applications (shown once, not stored): {creds.generate_token}\n"
        )
    sys.stdout.write("all services SERVING; a service that exits is restarted on its port; Ctrl-C stops them\n")
    sys.stdout.flush()
    del endpoints
    policy = RestartPolicy(max_failures=max(args.max_failures, 1), window=args.failure_window, start_timeout=args.timeout)
    try:
        stack.supervise(stop, policy)
    except FailedPrecondition as e:
        sys.stderr.write(f"selma up: {e}\n")
        return 1
    finally:
        if stack.poll() is None or any(sp.proc.poll() is None for sp in stack.processes.values()):
            sys.stdout.write("stopping ...\n")
            sys.stdout.flush()
            stack.stop()
    sys.stdout.write("stopped\n")
    return 0
