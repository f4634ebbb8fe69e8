"""``selma up --tls``: the local stack with TLS and bearer tokens, driven by the CLI, and no token left behind.

A real ``selma up --tls`` in a temporary directory; the CLI (in this process) generates an image
and runs an evaluation job, whose worker renders through ServingService with the services' own
token over TLS.  Then every file the stack wrote, the services' logs and their /metrics are
searched for the token values: only the two files meant to hold a token (``<dir>/token`` and the
services' token file, both mode 0600) may contain one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import _processes
import pytest

from selma.app.cli import main
from selma.auth import token_digest

pytestmark = pytest.mark.slow

TINY = ["--steps", "2", "--width", "64", "--height", "64"]


def selma(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_selma_up_tls_serves_the_cli_with_tokens_and_writes_no_token_anywhere(tmp_path, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SELMA_")]:
        monkeypatch.delenv(name)  # the CLI must find the CA and token through the stack's directory alone
    data = tmp_path / "stack"
    console = tmp_path / "selma-up.out"  # the terminal of `selma up`: the one place tokens are shown
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    env["OMP_NUM_THREADS"] = "1"
    with console.open("wb") as out:
        up = _processes.popen([sys.executable, "-m", "selma.app.cli", "up", "--tls", "--dir", str(data), "--timeout", "600"],
                              cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while "all services SERVING" not in console.read_text() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        text = console.read_text()
        assert "all services SERVING" in text, text[-3000:]
        admin = re.search(r"^admin token .*: (selma_\S+)$", text, re.M).group(1)
        generate = re.search(r"^generate-only token .*: (selma_\S+)$", text, re.M).group(1)
        services = (data / "tls" / "services.token").read_text().strip()
        endpoints = json.loads((data / "endpoints.json").read_text())
        assert endpoints["ca_cert"] == str(data / "tls" / "ca.crt") and endpoints["token_file"] == str(data / "token")
        assert (data / "token").read_text().strip() == admin
        for private in (data / "token", data / "tls" / "services.token", data / "tls" / "server.key"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        digests = json.dumps(__import__("yaml").safe_load((data / "tls" / "tokens.yaml").read_text()))
        assert all(token_digest(t) in digests for t in (admin, generate, services))

        # the admin token and CA from the directory, like a kubeconfig
        code, out, err = selma(capsys, "generate", "a red circle", "--dir", str(data), "-o", str(tmp_path / "a.png"), *TINY)
        assert code == 0, err
        assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
        # an application's generate-only token may generate ...
        code, out, err = selma(capsys, "generate", "a red circle", "--dir", str(data), "--token", generate, "-o", str(tmp_path / "b.png"), *TINY)
        assert code == 0, err
        # ... but not start jobs; a wrong token is refused, saying what to set
        eval_args = ["eval", "run", "--dir", str(data), "--benchmark", "dsg-1k", "--categories", "countbench", "--max-prompts", "1",
                     "--target", "base", "--vqa", "tiny:1", *TINY]
        code, out, err = selma(capsys, *eval_args, "--token", generate)
        assert code == 2 and "PERMISSION_DENIED" in err and "'run'" in err, err
        code, out, err = selma(capsys, "generate", "x", "--dir", str(data), "--token", "selma_wrong", "-o", str(tmp_path / "c.png"), *TINY)
        assert code == 2 and "UNAUTHENTICATED" in err and "SELMA_TOKEN" in err, err
        # a job: the evaluation worker renders through ServingService with the services' token over TLS
        code, out, err = selma(capsys, *eval_args)
        assert code == 0, err
        assert re.search(r"^report: eval-report-\S+$", out, re.M), out

        metrics = "".join(urllib.request.urlopen(url, timeout=30).read().decode() for url in endpoints["metrics"].values())
        assert re.search(r'selma_grpc_server_auth_total\{[^}]*grpc_method="Generate"[^}]*token="local-services"\} [1-9]', metrics)
        assert re.search(r'selma_grpc_server_auth_total\{[^}]*grpc_code="PERMISSION_DENIED"[^}]*token="local-app"\}', metrics)
    finally:
        _processes.stop_tree(up, first=signal.SIGINT, grace=120)
    assert up.returncode == 0, console.read_text()[-3000:]

    tokens = {"admin": admin, "generate": generate, "services": services}
    for name, token in tokens.items():
        assert token not in metrics, f"the {name} token is in /metrics"
    allowed = {data / "token": admin, data / "tls" / "services.token": services}
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files) and any("jobs" in p.parts for p in files)  # logs and job records are searched
    for path in files:
        for name, token in tokens.items():
            if allowed.get(path) != token:
                assert not contains(path, token.encode()), f"the {name} token is in {path}"


def contains(path: Path, needle: bytes, chunk: int = 16 * 1024 * 1024) -> bool:
    """``needle`` occurs in the file (read in chunks that overlap by its length: model weights are large)."""
    tail = b""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False
