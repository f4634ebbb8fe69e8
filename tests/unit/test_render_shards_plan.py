"""How a sharded render splits its images, and how the dataset writer adopts files shard workers uploaded."""

from __future__ import annotations

import pytest

from selma.artifacts import ArtifactStore, FileEntry
from selma.errors import AlreadyExists, FailedPrecondition, NotFound
from selma.storage import open_storage
from selma_render.dataset import Item, Prompt
from selma_render.shards import effective_shards, shard_batches, shard_items


@pytest.mark.parametrize("n_batches", [1, 2, 3, 7, 10, 64])
@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8])
def test_shards_are_contiguous_whole_batches_covering_every_batch_once(n_batches, shards):
    shards = effective_shards(shards, n_batches)
    ranges = [shard_batches(n_batches, shards, i) for i in range(shards)]
    assert [b for r in ranges for b in r] == list(range(n_batches))
    assert all(len(r) >= 1 for r in ranges)
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1  # balanced


def test_a_shard_holds_whole_batches_of_the_fixed_plan_whatever_the_shard_count():
    items = [Item(prompt=Prompt(id=f"p{i}", index=i, text="x"), image_index=0, seed=i) for i in range(11)]
    batch = 3  # batches [0..2] [3..5] [6..8] [9,10]
    for shards in (1, 2, 3, 4):
        parts = [shard_items(items, batch, shards, i) for i in range(shards)]
        assert [it for p in parts for it in p] == items
        for p in parts[:-1]:
            assert len(p) % batch == 0  # only the dataset's last batch is short, never a cut one
    assert effective_shards(9, 4) == 4 and effective_shards(0, 4) == 1


def test_adopted_files_become_the_artifact_only_when_it_is_published(tmp_path, make_settings):
    store = ArtifactStore(open_storage(make_settings()))
    with store.writer("prompt_set", key="ps") as w:
        w.put_bytes("prompts.jsonl", b'{"text": "a"}\n')
    parent = w.manifest.id
    staged = [store.put_staged_bytes("image-dataset-abc", f"images/00000{i}-0.png", b"png%d" % i) for i in range(2)]
    with pytest.raises(NotFound):
        store.get("image-dataset-abc")  # uploaded, not visible
    writer = store.writer("image_dataset", id="image-dataset-abc", parents=[parent])
    with pytest.raises(FailedPrecondition, match="images/000009-0.png"):
        writer.adopt([FileEntry(path="images/000009-0.png", size=3, sha256="0" * 64)])
    with writer as w:
        w.adopt(staged)
        w.put_bytes("metadata.jsonl", b"{}\n")
    m = store.get("image-dataset-abc")
    assert [f.path for f in m.files] == ["images/000000-0.png", "images/000001-0.png", "metadata.jsonl"]
    assert store.read_bytes(m, "images/000001-0.png") == b"png1"
    with pytest.raises(AlreadyExists):
        store.put_staged_bytes("image-dataset-abc", "images/000000-0.png", b"other")


def test_per_shard_progress_reaches_the_api():
    from selma_render.server import stats_to_proto
    from selma_render.shards import shard_progress

    doc = {"files": [{"path": "images/000000-0.png"}], "attempts": [{"rendered": 1}, {"rendered": 0}], "complete": False}
    out = stats_to_proto({"images_total": 4, "images_done": 1, "shards": [shard_progress(doc, 0, 2), shard_progress(None, 1, 2)]})
    assert [(s.index, s.images_total, s.images_done, s.attempts, s.complete) for s in out.shards] == [(0, 2, 1, 2, False), (1, 2, 0, 0, False)]
