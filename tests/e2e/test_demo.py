"""The README's first command (`make demo` → `selma demo`) works end to end, as written.

It starts the local stack, runs examples/quickstart.yaml (five skills, the embedded SmolLM2,
tiny models) through the gRPC services, generates an image with the merged model and stops
everything.  CI caps prompts per skill and training steps through the documented env vars.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _processes
import pytest
from PIL import Image

from selma.artifacts import ArtifactStore
from selma.storage import FileStorage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


# The demo takes minutes on a small CI box: its own limit (DEMO_TIMEOUT) stays below this test's
# pytest timeout, with room for stopping the stack (SIGINT: the demo drains its services; then SIGKILL).
DEMO_TIMEOUT = 900
STOP_GRACE = 60


@pytest.mark.timeout(DEMO_TIMEOUT + STOP_GRACE + 60)
def test_demo_runs_quickstart_to_a_merged_model_and_an_image(tmp_path: Path):
    selma = Path(sys.executable).parent / "selma"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELMA_DEMO_MAX_COUNT": "2", "SELMA_DEMO_MAX_STEPS": "4"}
    # its own process group; however the test ends, the demo and the services it started are stopped
    proc = _processes.run([str(selma), "demo", "--dir", str(tmp_path), "--plain"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=DEMO_TIMEOUT, grace=STOP_GRACE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    image = tmp_path / "quickstart.png"
    assert Image.open(image).size == (64, 64)
    store = ArtifactStore(FileStorage(tmp_path / "storage"))
    (merged,) = store.list("merged_model")
    assert store.get_alias("quickstart").artifact_id == merged.id
    chain = store.lineage(merged.id)
    prompt_sets = [m for m in chain if m.kind.value == "prompt_set"]
    assert {m.labels["selma.dev/skill"] for m in prompt_sets} == {"general", "paragraph", "real_user", "counting", "commonsense_defying"}
    assert len([m for m in chain if m.kind.value == "expert"]) == 5
    assert str(image) in proc.stdout
    # the stack was stopped: no endpoints file left behind
    assert not (tmp_path / "endpoints.json").exists()
