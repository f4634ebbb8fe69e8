"""A warm worker for the local launcher: a process that has imported the heavy libraries and forks each job.

A local worker used to be a fresh ``python -m selma.app.cli train …`` per job, and start-up plus
imports (torch, diffusers, transformers, peft) were most of a quickstart-sized job.  The *zygote*
imports them once; each job is then a child ``os.fork()``-ed from it, which runs the same command
line exactly as the fresh interpreter would (``-m module args`` through :mod:`runpy`, so
``sys.argv``, ``SystemExit`` codes and uncaught exceptions behave the same), in its own session
(process group), with the job's environment, working directory and log file as stdout/stderr.

Why not ``multiprocessing``'s forkserver (same idea: a preloaded server forking children)?  It
cannot give the server an environment of our choosing, re-imports the parent's ``__main__`` in every
child, ends children with ``os._exit`` (no ``atexit``, no join of non-daemon threads), joins
non-daemon children at the parent's exit, and when the server dies reports exit code 255 for
children that are in fact still running.  The protocol here is the forkserver's, cut to what we need:

* the launcher and the zygote share one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair; a job request
  is one JSON message (argv, env, cwd) carrying two file descriptors (``SCM_RIGHTS``): the write end
  of the job's status pipe and the job's log file;
* the zygote forks, writes the child's pid to the status pipe, reaps it on ``SIGCHLD`` and writes
  its exit status (``subprocess`` convention: ``-N`` = killed by signal N) to the same pipe;
* the launcher side is :class:`WarmChild`, a ``subprocess.Popen`` look-alike (``pid``, ``poll``,
  ``wait``, ``send_signal``, ``kill``, ``returncode``); signals go through a pidfd, so a reused pid
  is never signalled;
* the zygote exits when the launcher closes its socket (or dies: the kernel closes it).  A child
  gets SIGTERM when the zygote dies (``PR_SET_PDEATHSIG``; its worker also re-arms it for the
  pid in ``SELMA_BATCH_PARENT_PID``, which the child sets to the zygote's), checkpoints and exits;
  the launcher then sees the status pipe close without a status (:attr:`WarmChild.lost`), waits for
  the child to be gone and reports the attempt as a retryable failure.

Fork safety: the zygote runs no torch op and starts no Python thread (checked: it refuses to serve
with more than one Python thread).  The native threads it has are OpenBLAS's idle pools (numpy,
scipy), which OpenBLAS itself shuts down around ``fork()`` (``pthread_atfork``).

Environment: libraries read some variables at import, so a job runs warm only when its
environment equals the zygote's apart from ``SELMA_*`` (read at run time by selma's settings) and
the thread counts ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, which the child applies to torch
(``torch.set_num_threads``) before its first op.  Any other difference: :meth:`WarmWorker.accepts`
says no and the launcher starts a plain subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Per-job variables the zygote applies itself; every other variable must match the zygote's.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
PER_JOB_PREFIX = "SELMA_"
MAX_MESSAGE = 1 << 20  # one job request (argv + environment) as JSON
_STATUS = struct.Struct("!i")
_PR_SET_PDEATHSIG = 1


class WarmWorkerError(RuntimeError):
    """The zygote could not be started or could not start a job (the launcher falls back to a subprocess)."""


def _significant(env: Mapping[str, str]) -> dict[str, str]:
    """The variables a job must share with the zygote (those a library may read at import)."""
    return {k: v for k, v in env.items() if not k.startswith(PER_JOB_PREFIX) and k not in THREAD_VARS}


# ----------------------------------------------------------------------------------------------
# the launcher side


class WarmChild:
    """One job forked by the zygote, with the parts of ``subprocess.Popen`` the local launcher uses."""

    def __init__(self, args: Sequence[str], pid: int, status_r: int) -> None:
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False  # the zygote died before it could report this child's exit status
        self._status_r: int | None = status_r
        self._lock = threading.Lock()  # signals vs closing the pidfd
        # One reader of the status pipe at a time: the launcher's wait() and a Cancel RPC's poll() race.
        self._check_lock = threading.Lock()
        self._eof_at: float | None = None  # when the zygote was seen gone (the child then gets PDEATHSIG)
        self._killed_at: float | None = None
        self._pidfd: int | None = None
        self._gone = False  # exited and reaped before we could hold it: its status is in the pipe
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
        except OSError:  # no pidfds (Linux < 5.3): signals go by pid, as subprocess.Popen sends them
            pass

    def poll(self) -> int | None:
        return self._check(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._check(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is not None or self._gone:
                return
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    GRACE_SECONDS = 60.0  # a child that outlives its zygote this long (it got SIGTERM) is killed

    def _check(self, timeout: float | None) -> int | None:
        """The exit status once known; ``timeout`` 0 never blocks (a poll while another thread reads
        the status answers None), None waits until the child is gone."""
        if self.returncode is not None:
            return self.returncode
        if not self._check_lock.acquire(blocking=timeout != 0):
            return None
        try:
            if self.returncode is not None:
                return self.returncode
            if self._eof_at is None:
                fd = self._status_r
                assert fd is not None
                ready, _, _ = select.select([fd], [], [], timeout)
                if not ready:
                    return None
                data = _read_exact(fd, _STATUS.size)
                if len(data) == _STATUS.size:
                    self._finish(_STATUS.unpack(data)[0])
                    return self.returncode
                # the zygote died: the child got SIGTERM (PDEATHSIG); it is reported lost once it is gone
                self.lost = True
                self._eof_at = time.monotonic()
            if self._gone_within(timeout):
                self._finish(-signal.SIGTERM)
            return self.returncode
        finally:
            self._check_lock.release()

    def _gone_within(self, timeout: float | None) -> bool:
        """Whether the child (its zygote gone) has exited within ``timeout`` s (None: wait, killing it
        after GRACE_SECONDS and reporting it 30 s later whatever happens)."""
        if self._pidfd is None:
            return True
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            assert self._eof_at is not None
            if self._killed_at is None and now >= self._eof_at + self.GRACE_SECONDS:
                log.warning("job process %d outlived its zygote by %.0f s; killing it", self.pid, self.GRACE_SECONDS)
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    return True
                self._killed_at = now
            give_up = self._killed_at + 30.0 if self._killed_at is not None else self._eof_at + self.GRACE_SECONDS
            step_end = give_up if end is None else min(end, give_up)
            ready, _, _ = select.select([self._pidfd], [], [], max(0.0, step_end - now))
            if ready:
                return True
            if self._killed_at is not None and time.monotonic() >= self._killed_at + 30.0:
                return True
            if end is not None and time.monotonic() >= end:
                return False

    def _finish(self, code: int) -> None:
        with self._lock:
            self.returncode = code
            for fd in (self._status_r, self._pidfd):
                if fd is not None:
                    os.close(fd)
            self._status_r = self._pidfd = None

    def __del__(self) -> None:
        for fd in (getattr(self, "_status_r", None), getattr(self, "_pidfd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class WarmWorker:
    """The launcher's handle on one zygote process: start it, fork jobs from it, stop it.

    ``env`` is the zygote's environment (the jobs' environment without their per-job part);
    ``preload`` the modules it imports before serving; ``log_path`` where its own output goes.
    """

    def __init__(self, *, python: str, env: Mapping[str, str], preload: Sequence[str], log_path: Path, start_timeout: float = 600.0) -> None:
        self.python = python
        self.env = {k: v for k, v in env.items() if k not in THREAD_VARS}
        self._signature = _significant(self.env)
        self.preload = list(preload)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()

    # -- life cycle

    def start(self) -> None:
        """Start the zygote and wait (bounded) until it has imported ``preload``; WarmWorkerError otherwise."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        try:
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    [self.python, "-m", "selma.batch.zygote", str(theirs.fileno()), *self.preload],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    pass_fds=[theirs.fileno()], start_new_session=True,
                )
        finally:
            theirs.close()
        ours.settimeout(self.start_timeout)
        try:
            hello = ours.recv(MAX_MESSAGE)
        except TimeoutError:
            self._abandon(ours)
            raise WarmWorkerError(f"the warm worker did not finish its imports within {self.start_timeout:.0f} s (see {self.log_path})") from None
        except OSError as e:
            self._abandon(ours)
            raise WarmWorkerError(f"the warm worker failed to start: {e} (see {self.log_path})") from None
        if not hello:
            self._abandon(ours)
            raise WarmWorkerError(f"the warm worker exited during its imports (see {self.log_path})")
        self.info = json.loads(hello)
        if self.info.get("python_threads", 1) != 1:
            self._abandon(ours)
            raise WarmWorkerError(f"the warm worker has {self.info['python_threads']} Python threads after its imports; forking it is unsafe")
        if self.info.get("cuda_initialized"):
            self._abandon(ours)
            raise WarmWorkerError("a preloaded module initialised CUDA in the warm worker; a CUDA context does not survive fork")
        ours.settimeout(None)
        self._sock = ours
        log.info("warm worker ready: pid %d, %d modules imported in %.1f s", self.proc.pid, len(self.info.get("imported", [])),
                 self.info.get("import_seconds", 0.0))

    def alive(self) -> bool:
        return self._sock is not None and self.proc is not None and self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the zygote (its running children get SIGTERM through PDEATHSIG, as with a stopping service)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # EOF: the zygote exits
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _abandon(self, sock: socket.socket) -> None:
        sock.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # -- jobs

    def accepts(self, command: Sequence[str], env: Mapping[str, str]) -> bool:
        """Whether this zygote can run ``command`` with ``env`` exactly as a fresh interpreter would."""
        if len(command) < 3 or command[0] != self.python or command[1] not in ("-m", "-c"):
            return False
        return _significant(env) == self._signature

    def spawn(self, command: Sequence[str], *, env: Mapping[str, str], stdout: int, cwd: str | None = None) -> WarmChild:
        """Fork ``command`` (``python -m module args`` or ``python -c code args``) with stdout+stderr to ``stdout``."""
        sock = self._sock
        if sock is None:
            raise WarmWorkerError("the warm worker is not running")
        msg = json.dumps({"argv": list(command[1:]), "env": dict(env), "cwd": cwd or os.getcwd()}).encode()
        if len(msg) > MAX_MESSAGE:
            raise WarmWorkerError(f"job request of {len(msg)} bytes exceeds the warm worker's {MAX_MESSAGE}-byte limit")
        status_r, status_w = os.pipe()
        try:
            with self._send_lock:
                socket.send_fds(sock, [msg], [status_w, stdout])
        except OSError as e:
            os.close(status_r)
            self.close(timeout=5)
            raise WarmWorkerError(f"the warm worker is gone: {e}") from None
        finally:
            os.close(status_w)
        ready, _, _ = select.select([status_r], [], [], 60)
        data = _read_exact(status_r, _STATUS.size) if ready else b""
        if len(data) != _STATUS.size:
            os.close(status_r)
            if not ready:
                # A zygote that does not answer is replaced (the launcher restarts it), although its running
                # jobs then get SIGTERM (they checkpoint and are retried): kept alive, it could still fork this
                # job late, unwatched, beside the plain subprocess the launcher now runs instead.
                self.close(timeout=5)
            raise WarmWorkerError("the warm worker did not start the job" + ("" if ready else " within 60 s"))
        return WarmChild(command, _STATUS.unpack(data)[0], status_r)


# ----------------------------------------------------------------------------------------------
# the zygote process: python -m selma.batch.zygote FD MODULE...


def _arm_parent_death_signal(sig: int) -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def _preload(modules: Sequence[str]) -> list[str]:
    import importlib

    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            log.info("warm worker: %s is not installed; not preloaded", name)
            continue
        done.append(name)
    return done


def _cuda_initialized() -> bool:
    """A CUDA context does not survive fork: a preload that initialised one makes the zygote unusable."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a torch without CUDA support
        return False


def serve(ctrl: socket.socket, modules: Sequence[str]) -> int:
    """Import ``modules``, say hello, then fork one child per request until the launcher hangs up."""
    # No PR_SET_PDEATHSIG here: it follows the launcher *thread* that started us, not its process.  The
    # launcher's end of ``ctrl`` closes when its process dies, and EOF ends this loop.
    t0 = time.perf_counter()
    imported = _preload(modules)
    hello = {"pid": os.getpid(), "imported": imported, "import_seconds": round(time.perf_counter() - t0, 3),
             "python_threads": threading.active_count(), "cuda_initialized": _cuda_initialized()}
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here may reach a job's log through fork
        stream.flush()
    ctrl.send(json.dumps(hello).encode())
    if threading.active_count() != 1 or hello["cuda_initialized"]:
        return 1

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is for the service, which stops us by EOF
    children: dict[int, int] = {}  # pid -> the write end of its status pipe
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ctrl:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(ctrl, MAX_MESSAGE, 2)
                except OSError:
                    data, fds = b"", []
                if not data:
                    return 0
                if len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    continue
                status_w, out = fds
                try:
                    pid = os.fork()
                except OSError as e:  # EAGAIN/ENOMEM: the launcher sees the status pipe close and runs the job itself
                    log.warning("warm worker: fork failed: %s", e)
                    os.close(out)
                    os.close(status_w)
                    continue
                if pid == 0:
                    code = 70
                    try:
                        sel.close()
                        for fd in (ctrl.fileno(), wake_r, wake_w, *children.values()):
                            os.close(fd)
                        code = _child(json.loads(data), out, status_w)
                    finally:
                        os._exit(code)
                os.close(out)
                try:
                    os.write(status_w, _STATUS.pack(pid))
                except OSError:
                    pass
                children[pid] = status_w
            else:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            _reap(children)


def _reap(children: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = children.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            os.close(fd)


def _child(req: dict[str, Any], out: int, status_w: int) -> int:
    """In the forked child: become the job's fresh process, run its command line, return its exit code."""
    os.close(status_w)
    zygote = os.getppid()
    _arm_parent_death_signal(signal.SIGTERM)  # as a worker arms it against its service: checkpoint, exit
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() != zygote:  # the zygote died before the signal was armed
        return 143
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    env = dict(req["env"])
    if env.get("SELMA_BATCH_PARENT_PID", "0") not in ("", "0"):
        env["SELMA_BATCH_PARENT_PID"] = str(zygote)  # our parent is the zygote, which dies with the service
    os.environ.clear()
    os.environ.update(env)
    os.chdir(req["cwd"])
    _apply_threads(env)
    _reseed()
    return _run_argv(req["argv"])


def _apply_threads(env: Mapping[str, str]) -> None:
    """Per-job thread counts, set before the job's first torch op (the zygote never ran one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    value = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    try:
        n = int(value) if value else 0
    except ValueError:
        n = 0
    if n > 0:
        torch.set_num_threads(n)


def _reseed() -> None:
    """What a fresh process would have: numpy's global generator seeded from the OS (``random`` reseeds itself at fork)."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def _run_argv(argv: list[str]) -> int:
    """``python -m module args`` / ``python -c code args``, with the interpreter's exit semantics."""
    import atexit
    import runpy
    import traceback

    code = 0
    try:
        if argv[0] == "-m":
            # a fresh ``python -m`` has not imported the module yet: a preloaded copy stays for other importers
            sys.modules.pop(argv[1], None)
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *argv[2:]]
            main = type(sys)("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)  # noqa: S102 - the job's own -c program, as python -c runs it
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    # what interpreter shutdown does before the process ends: join non-daemon threads, run atexit
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    sys.stderr.write(f"{value}\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # no logging set-up here: the children inherit it, and each job configures its own
    ctrl = socket.socket(fileno=int(args[0]))
    return serve(ctrl, args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
