"""Shared fixtures: an S3 server (moto) on 127.0.0.1 and storage on both backends.

``moto_server`` runs as a subprocess for the whole session, is stopped by its PID at the end,
and every test gets its own bucket, so no state leaks between tests.

Every process a test or fixture starts goes through ``tests/_processes.py`` (``import _processes``):
its own process group, stopped as a tree however the test ends; ``pytest_sessionfinish`` below
fails the run if any of them is still alive at the end.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _processes
import pytest

from selma.config import SelmaSettings
from selma.storage import Storage, open_storage

MiB = 1024 * 1024
S3_PART_SIZE = 5 * MiB  # the S3 minimum, so multipart shows up with small test data


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_binary() -> str:
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("moto_server")
    if not found:
        pytest.fail("moto_server not found: install the test extra (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a moto S3 server on 127.0.0.1 (credentials are not checked)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log_path.open("wb") as log_file:
        proc = _processes.popen(
            [_moto_server_binary(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on 127.0.0.1:{port} within 20 s")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        _processes.stop_tree(proc, first=signal.SIGTERM, grace=5)


def unique_bucket() -> str:
    return f"selma-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., SelmaSettings]:
    """Build settings for tests: fast retries, 5 MiB parts, isolated from SELMA_* variables."""

    def make(**overrides: Any) -> SelmaSettings:
        values: dict[str, Any] = dict(
            data_dir=tmp_path / "data",
            cache_dir=tmp_path / "cache",  # models cached per test, as the data dir used to hold them
            storage_uri=(tmp_path / "storage").as_uri(),
            s3_endpoint="",
            s3_access_key="testing",
            s3_secret_key="testing",
            s3_region="us-east-1",
            s3_secure=False,
            s3_create_buckets=True,
            storage_retries=2,
            storage_backoff_seconds=0.01,
            s3_part_size=S3_PART_SIZE,
        )
        values.update(overrides)
        return SelmaSettings(**values)

    return make


@pytest.fixture(params=["file", "s3"])
def storage_settings(request: pytest.FixtureRequest, make_settings: Callable[..., SelmaSettings]) -> SelmaSettings:
    """Settings whose storage is a fresh local directory or a fresh bucket on the moto server."""
    if request.param == "file":
        return make_settings()
    endpoint = request.getfixturevalue("s3_server")
    return make_settings(storage_uri=f"s3://{unique_bucket()}/root", s3_endpoint=f"http://{endpoint}")


@pytest.fixture
def storage(storage_settings: SelmaSettings) -> Storage:
    """An empty storage on each backend in turn (file:// and s3://)."""
    return open_storage(storage_settings)


_STORAGE_FIELDS = (
    "data_dir",
    "storage_uri",
    "s3_endpoint",
    "s3_access_key",
    "s3_secret_key",
    "s3_region",
    "s3_secure",
    "s3_create_buckets",
    "storage_retries",
    "storage_backoff_seconds",
    "s3_part_size",
)


def settings_env(settings: SelmaSettings) -> dict[str, str]:
    """The SELMA_* variables that reproduce ``settings``' storage configuration in a child process."""
    env = {}
    for name in _STORAGE_FIELDS:
        value = getattr(settings, name)
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"SELMA_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.fixture
def stalled_writer() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``tests/integration/_storage_writer.py`` and return once its upload is under way.

    ``start(settings, mode, target, ready_bytes)`` → the process, stalled mid-upload; the test
    kills it.  Any process still alive at teardown is killed by PID.
    """
    script = Path(__file__).parent / "integration" / "_storage_writer.py"
    shared = str(Path(__file__).resolve().parents[1] / "shared")
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: SelmaSettings, mode: str, target: str, ready_bytes: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, **settings_env(settings)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shared, env.get("PYTHONPATH", "")) if p)
        proc = _processes.popen(
            [sys.executable, str(script), mode, target, str(ready_bytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        started.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"writer process did not get going: {err.decode(errors='replace')[-2000:]}")
        return proc

    yield start
    for proc in started:
        _processes.stop_tree(proc, first=signal.SIGKILL, grace=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """The offline tiny SD/SDXL pipelines, tokenizer and LM, built once per test session."""
    import torch

    from selma.models.tiny import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (the moto server's included)
def pytest_configure(config: pytest.Config) -> None:
    # Services and CLIs the suite starts share one model cache for the session, never the user's ~/.cache/selma.
    if "SELMA_CACHE_DIR" not in os.environ:
        os.environ["SELMA_CACHE_DIR"] = tempfile.mkdtemp(prefix="selma-test-cache-")
        config._selma_cache_dir = os.environ["SELMA_CACHE_DIR"]  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = getattr(config, "_selma_cache_dir", "")
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("SELMA_CACHE_DIR", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process the suite started outlived it (it is killed, by PID, and listed)."""
    lines = _processes.leak_report()
    if lines:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = f"{len(lines)} process(es) started by the tests were still running at the end (now killed):"
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
            for line in lines:
                tr.write_line("  " + line, red=True)
        else:
            sys.stderr.write(msg + "\n" + "\n".join(lines) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
