"""The README's main command (`make demo` → `selma demo`) works end to end on a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from selma.artifacts import ArtifactStore
from selma.storage import FileStorage

pytestmark = pytest.mark.slow


def test_demo_publishes_dataset_with_lineage_back_to_prompts(tmp_path: Path):
    selma = Path(sys.executable).parent / "selma"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(selma), "demo", "--dir", str(tmp_path), "--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    store = ArtifactStore(FileStorage(tmp_path / "storage"))
    (dataset,) = store.list("image_dataset")
    chain = store.lineage(dataset.id)
    assert [m.kind.value for m in chain] == ["image_dataset", "prompt_set"]
    rows = [json.loads(line) for line in store.read_bytes(dataset.id, "metadata.jsonl").decode().splitlines()]
    prompts = [json.loads(line) for line in store.read_bytes(chain[1].id, "prompts.jsonl").decode().splitlines()]
    assert [r["text"] for r in rows] == [p["text"] for p in prompts]
    for r in rows:
        with store.open(dataset.id, r["file_name"]) as f:
            assert Image.open(f).size == (64, 64)
    assert dataset.id in proc.stdout
