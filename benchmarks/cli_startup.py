"""Start-up of a client command: the imports it loads before its first RPC (#24, job start-up).

Each side runs one ``selma`` command in a **fresh interpreter** (``python -c``, ``OMP_NUM_THREADS=1``)
and is timed from spawn to exit:

* ``eager imports (before)`` — the baseline: the command with the imports main at 4335747 loaded for
  it.  There ``selma.logs.quiet_third_party`` (run by every ``main()``) did
  ``from transformers.utils import logging; logging.get_logger()`` to filter one warning, which loads
  transformers' utilities with numpy, PIL and huggingface_hub.  The baseline runs exactly those two
  lines, then the same ``selma.app.cli.main(argv)``: the old cost, reproduced in today's tree without
  a second checkout or venv;
* ``trimmed (now)`` — the same ``main(argv)`` alone (the filter now sits on the warning's logger,
  no import).

Both sides are checked on every call: the exit code is the expected one, and transformers is loaded
by the baseline only.  Commands: ``generate`` failing at a missing endpoints file (the
fastest a client command ends), and ``eval list`` and ``models list`` against a port that refuses
connections (their first RPC fails UNAVAILABLE; the gRPC reconnect backoff is in both sides).
``selma --help`` is not compared: argparse exits before ``quiet_third_party`` ever ran, so it paid
nothing there.  One comparison per command through the shared harness: warm-up excluded, order
rotated per block, paired ratios.

    cd benchmarks && OMP_NUM_THREADS=1 ../.venv/bin/python cli_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import compare

# What main at 4335747's quiet_third_party ran in every selma process.
EAGER = "from transformers.utils import logging as _hf\n_hf.get_logger()\n"
RUN = """
import json, sys
from selma.app.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
sys.stderr.write("\\n" + json.dumps({"rc": rc, "transformers": "transformers" in sys.modules}) + "\\n")
"""


def side(cwd: Path, argv: list[str], rc: int, *, eager: bool):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    env["OMP_NUM_THREADS"] = "1"
    code = (EAGER if eager else "") + RUN

    def call() -> None:
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        result = json.loads(proc.stderr.strip().splitlines()[-1])
        if result["rc"] != rc or result["transformers"] != eager:
            raise RuntimeError(f"selma {' '.join(argv)} (eager={eager}): {result}; stderr:\n{proc.stderr[-2000:]}")
    return call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="selma-cli-startup-") as tmp, socket.socket() as refusing:
        root = Path(tmp)
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused at once
        addr = f"127.0.0.1:{refusing.getsockname()[1]}"
        endpoints = root / "endpoints.json"
        endpoints.write_text(json.dumps({"prompts": addr, "render": addr, "training": addr, "serving": addr}))
        commands = [
            (["generate", "--endpoints", str(root / "missing.json"), "a red circle", "-o", "out.png"], 2,
             "selma generate, missing endpoints file (fails before any RPC)"),
            (["eval", "list", "--endpoints", str(endpoints)], 2, "selma eval list, refused port (up to its first RPC)"),
            (["models", "list", "--endpoints", str(endpoints)], 2, "selma models list, refused port (up to its first RPC)"),
        ]
        for argv, rc, title in commands:
            sides = {"eager imports (before)": side(root, argv, rc, eager=True), "trimmed (now)": side(root, argv, rc, eager=False)}
            cmp = compare(sides, baseline="eager imports (before)", repeats=args.repeats, warmup=1, title=f"{title}, fresh interpreter per call")
            cmp.print(unit="s", per="command")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
