"""#24, job start-up: a client command loads only what it uses.

Each command runs in a fresh interpreter (``selma.app.cli.main`` under ``sys.executable -c``) against
an endpoints file whose addresses refuse connections, so it goes as far as its first RPC; then the
interpreter's ``sys.modules`` is checked.  A command that only talks gRPC (or reads a file:// store)
must not have imported torch, diffusers, transformers, numpy, PIL, kubernetes or minio: each of them
is a process-start cost (transformers alone was most of a `selma generate` that failed at once).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selma.logs import quiet_third_party

REPO = Path(__file__).resolve().parents[2]

# What no client command may load: the ML stack, the Kubernetes client, the S3 client.
HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "safetensors", "kubernetes", "minio", "matplotlib")

_PROBE = """
import json, sys
from selma.app.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
sys.stdout.flush()
sys.stderr.write("\\n" + json.dumps({"rc": rc, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in @HEAVY@)}) + "\\n")
""".replace("@HEAVY@", repr(HEAVY))


def _probe(argv: list[str], cwd: Path) -> tuple[dict, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    return result, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def refused_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An endpoints file naming a port that is bound but not listening: every call fails at once (UNAVAILABLE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{sock.getsockname()[1]}"
    path = tmp_path_factory.mktemp("endpoints") / "endpoints.json"
    path.write_text(json.dumps({"prompts": addr, "render": addr, "training": addr, "serving": addr}))
    try:
        yield path
    finally:
        sock.close()


# (argv after --endpoints FILE is added where the command takes it, expected exit code)
CLIENT_COMMANDS = [
    (["run", "--wait", "1", "--plain", str(REPO / "examples" / "quickstart.yaml")], 2),
    (["status", "quickstart"], 2),
    (["runs"], 0),
    (["runs", "delete", "quickstart"], 2),
    (["generate", "a red circle", "-o", "out.png"], 2),
    (["models", "list"], 2),
    (["models", "delete", "m1"], 2),
    (["experts", "list"], 2),
    (["lineage", "a1"], 2),
    (["artifacts", "gc"], 2),
    (["eval", "run", "--target", "base"], 2),
    (["eval", "status", "j1"], 2),
    (["eval", "list"], 2),
    (["eval", "cancel", "j1"], 2),
]


@pytest.mark.parametrize(("argv", "rc"), CLIENT_COMMANDS, ids=[" ".join(a[:2]) for a, _ in CLIENT_COMMANDS])
def test_a_client_command_up_to_its_first_rpc_loads_no_ml_kubernetes_or_s3_library(argv, rc, refused_endpoints, tmp_path):
    result, _out, err = _probe([*argv, "--endpoints", str(refused_endpoints)], tmp_path)
    assert result["rc"] == rc, err
    assert result["loaded"] == [], f"`selma {' '.join(argv)}` imported {result['loaded']}"


def test_a_client_command_failing_at_a_missing_endpoints_file_loads_no_heavy_library(tmp_path):
    result, _out, err = _probe(["generate", "--endpoints", str(tmp_path / "missing.json"), "a red circle", "-o", "out.png"], tmp_path)
    assert result["rc"] == 2 and "no endpoints file" in err
    assert result["loaded"] == []


@pytest.mark.parametrize("argv", [
    ["auth", "token", "--name", "ci", "--scopes", "generate"],
    ["artifacts", "list", "--dir", "missing"],
    ["eval", "report", "--dir", "missing", "r1"],
    ["eval", "gate-report", "--dir", "missing", "d1"],
], ids=lambda a: " ".join(a[:2]))
def test_a_local_command_that_reads_no_images_loads_no_heavy_library(argv, tmp_path):
    result, _out, err = _probe(argv, tmp_path)
    assert result["rc"] in (0, 2), err
    assert result["loaded"] == [], f"`selma {' '.join(argv)}` imported {result['loaded']}"


def test_help_lists_the_plugin_commands_without_loading_them(tmp_path):
    result, out, _err = _probe(["--help"], tmp_path)
    assert result["rc"] == 0
    assert "shapesworld" in out and "generate" in out  # plugins still register their commands
    assert result["loaded"] == []


def test_quiet_third_party_drops_the_torchvision_warning_without_importing_transformers():
    logger = logging.getLogger("transformers.utils.import_utils")
    saved = list(logger.filters)
    try:
        quiet_third_party()
        quiet_third_party()  # idempotent: one filter, not one per call
        assert len([f for f in logger.filters if type(f).__name__ == "_DropMessages"]) == 1
        noise = logger.makeRecord(logger.name, logging.WARNING, __file__, 0,
                                  "`CLIPImageProcessor` requires torchvision (not installed); falling back", None, None)
        other = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "something else", None, None)
        assert not logger.filter(noise) and logger.filter(other)
    finally:
        logger.filters[:] = saved


def test_the_real_transformers_torchvision_warning_is_silenced_when_quieted_before_transformers_loads(tmp_path):
    trigger = "import transformers; transformers.CLIPImageProcessor"
    loud = subprocess.run([sys.executable, "-c", trigger], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "requires torchvision" in loud.stderr, "this transformers no longer warns about torchvision: quiet_third_party's filter can go"
    quiet = subprocess.run([sys.executable, "-c", "from selma.logs import quiet_third_party; quiet_third_party(); " + trigger],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "requires torchvision" not in quiet.stderr


@pytest.mark.parametrize("argv", [["train", "--config", "missing.json"], ["eval", "execute", "--config", "missing.json"]], ids=["train", "eval execute"])
def test_a_local_job_process_on_file_storage_loads_neither_the_kubernetes_nor_the_s3_client(argv, tmp_path):
    # the worker of a local launcher: a file:// store and no Kubernetes API (torch it may load: it trains or renders)
    result, _out, err = _probe(argv, tmp_path)
    assert result["rc"] == 2 and "missing.json" in err, err
    assert not {"kubernetes", "minio"} & {m.split(".")[0] for m in result["loaded"]}, result["loaded"]
