"""Artifacts with lineage on both backends: publish, read, resume, immutability, atomicity."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from selma.artifacts import ArtifactStore, Manifest, Producer, files_digest
from selma.config import SelmaSettings
from selma.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from selma.storage import Storage, open_storage

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def store(storage: Storage) -> ArtifactStore:
    return ArtifactStore(storage, producer=Producer(name="selma-test", version="1"))


def publish(store: ArtifactStore, kind: str, files: dict[str, bytes], parents: tuple[str, ...] = (), **kw: object) -> Manifest:
    with store.writer(kind, parents=parents, **kw) as w:  # type: ignore[arg-type]
        for path, data in files.items():
            w.put_bytes(path, data)
    assert w.manifest is not None
    return w.manifest


def test_published_artifact_has_a_complete_manifest_and_verified_files(store: ArtifactStore, tmp_path: Path) -> None:
    prompts = publish(store, "prompt_set", {"prompts.jsonl": b'{"prompt": "a cat"}\n'})
    with store.writer("image_dataset", key="render-job-1", parents=[prompts.id], parameters={"n": 2}, labels={"skill": "counting"}) as w:
        w.put_bytes("images/0.png", b"png0")
        w.put_stream("images/1.png", iter([b"png", b"1"]))
        local = tmp_path / "meta.json"
        local.write_bytes(b"{}")
        w.put_file("meta.json", local)
    m = store.get(w.id)
    assert m.id == store.new_id("image_dataset", "render-job-1") and m.id.startswith("image-dataset-")
    assert m.kind.value == "image_dataset"
    assert [f.path for f in m.files] == ["images/0.png", "images/1.png", "meta.json"]
    assert m.file("images/1.png").sha256 == hashlib.sha256(b"png1").hexdigest()
    assert m.digest == files_digest(m.files)
    assert m.parents == (prompts.id,) and m.parameters == {"n": 2} and m.labels == {"skill": "counting"}
    assert m.producer == Producer(name="selma-test", version="1")
    assert m.created_at.tzinfo is not None
    assert m.uri == store.storage.uri_for(f"artifacts/{m.id}")
    assert store.read_bytes(m.id, "images/1.png") == b"png1"
    with store.open(m.id, "images/0.png") as f:
        assert f.read() == b"png0"
    out = store.download(m.id, tmp_path / "dl")
    assert (out / "images" / "1.png").read_bytes() == b"png1" and (out / "meta.json").read_bytes() == b"{}"
    assert [a.id for a in store.list()] == [prompts.id, m.id]
    assert [a.id for a in store.list("image_dataset")] == [m.id]
    assert [a.id for a in store.list(labels={"skill": "counting"})] == [m.id]
    assert store.list("expert") == []
    with pytest.raises(NotFound, match="has no file"):
        store.read_bytes(m.id, "missing.png")


def test_unpublished_artifact_is_invisible_until_the_manifest_is_written(store: ArtifactStore) -> None:
    assert store.list() == []
    with store.writer("expert", key="train-1") as w:
        w.put_bytes("adapter.safetensors", b"weights")
        with pytest.raises(NotFound, match=f"artifact {w.id} does not exist"):
            store.get(w.id)
        assert store.list() == [] and not store.exists(w.id)
    assert store.exists(w.id) and [a.id for a in store.list()] == [w.id]


def test_exception_in_the_writer_publishes_nothing(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError):
        with store.writer("expert", key="train-2") as w:
            w.put_bytes("adapter.safetensors", b"weights")
            raise RuntimeError("training diverged")
    with pytest.raises(NotFound):
        store.get(w.id)
    assert store.list() == []


def test_publish_requires_published_parents(store: ArtifactStore) -> None:
    with pytest.raises(NotFound, match="parent artifact prompt-set-nope"):
        publish(store, "image_dataset", {"a": b"a"}, parents=("prompt-set-nope",))
    with pytest.raises(InvalidArgument, match="own parent"):
        store.writer("expert", id="expert-x", parents=["expert-x"])


def test_lineage_walks_from_a_merged_model_back_to_the_prompts(store: ArtifactStore) -> None:
    prompts = publish(store, "prompt_set", {"p.jsonl": b"p"})
    ds_a = publish(store, "image_dataset", {"a.png": b"a"}, parents=(prompts.id,))
    ds_b = publish(store, "image_dataset", {"b.png": b"b"}, parents=(prompts.id,))
    ex_a = publish(store, "expert", {"w": b"wa"}, parents=(ds_a.id,))
    ex_b = publish(store, "expert", {"w": b"wb"}, parents=(ds_b.id,))
    merged = publish(store, "merged_model", {"w": b"m"}, parents=(ex_a.id, ex_b.id), parameters={"method": "ties"})
    chain = [m.id for m in store.lineage(merged.id)]
    assert chain == [merged.id, ex_a.id, ex_b.id, ds_a.id, ds_b.id, prompts.id]  # breadth first, each once
    assert [m.id for m in store.lineage(prompts.id)] == [prompts.id]
    with pytest.raises(NotFound):
        store.lineage("merged-model-missing")


def test_lineage_is_cycle_safe_and_skips_deleted_ancestors(store: ArtifactStore) -> None:
    a = publish(store, "expert", {"w": b"a"})
    b = publish(store, "expert", {"w": b"b"}, parents=(a.id,))
    # Forge a cycle a -> b -> a by rewriting a's manifest; the API itself cannot make one.
    forged = a.model_copy(update={"parents": (b.id,)})
    store.storage.put_bytes(f"artifacts/{a.id}/manifest.json", forged.model_dump_json().encode())
    assert [m.id for m in store.lineage(b.id)] == [b.id, a.id]
    store.delete(a.id)
    assert [m.id for m in store.lineage(b.id)] == [b.id]


def test_republishing_identical_content_is_a_no_op(store: ArtifactStore) -> None:
    first = publish(store, "prompt_set", {"p.jsonl": b"same"}, key="gen-1", parameters={"n": 1})
    again = publish(store, "prompt_set", {"p.jsonl": b"same"}, key="gen-1", parameters={"n": 1})
    assert again == first  # the original manifest, created_at included
    with store.writer("prompt_set", key="gen-1", parameters={"n": 1}) as w:
        assert set(w.existing()) == {"p.jsonl"}  # a retried job can see it has nothing to do
    assert w.manifest == first


def test_republishing_different_content_is_already_exists_and_leaves_the_original(store: ArtifactStore) -> None:
    first = publish(store, "prompt_set", {"p.jsonl": b"original"}, key="gen-2")
    with pytest.raises(AlreadyExists, match="immutable"):
        publish(store, "prompt_set", {"p.jsonl": b"changed"}, key="gen-2")
    with pytest.raises(AlreadyExists, match="different content"):
        publish(store, "prompt_set", {"p.jsonl": b"original"}, key="gen-2", parameters={"n": 2})
    with pytest.raises(AlreadyExists):
        publish(store, "prompt_set", {"p.jsonl": b"original", "extra": b"x"}, key="gen-2")
    assert store.get(first.id) == first
    assert store.read_bytes(first.id, "p.jsonl") == b"original"


def test_reopened_writer_resumes_with_prior_uploads(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError):
        with store.writer("latent_cache", key="cache-1") as w:
            w.put_bytes("0.pt", b"zero")
            w.put_stream("1.pt", iter([b"one"]))
            raise RuntimeError("preempted")
    with store.writer("latent_cache", key="cache-1") as w2:
        existing = w2.existing()
        assert sorted(existing) == ["0.pt", "1.pt"]
        assert existing["1.pt"].sha256 == hashlib.sha256(b"one").hexdigest()
        w2.put_bytes("2.pt", b"two")
    m = store.get(w2.id)
    assert [f.path for f in m.files] == ["0.pt", "1.pt", "2.pt"]
    assert store.read_bytes(m.id, "0.pt") == b"zero"
    assert store.storage.list(f"artifacts/{m.id}/staging") == []  # the journal is gone


def test_writer_killed_mid_upload_leaves_no_artifact_and_can_be_resumed(
    store: ArtifactStore, storage_settings: SelmaSettings, stalled_writer: Callable[..., object]
) -> None:
    artifact_id = store.new_id("image_dataset", "render-killed")
    proc = stalled_writer(storage_settings, "artifact", artifact_id, 12 * MiB)
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait(timeout=10)  # type: ignore[attr-defined]

    with pytest.raises(NotFound):
        store.get(artifact_id)
    assert store.list() == []
    visible = {o.key for o in store.storage.list()}
    assert f"artifacts/{artifact_id}/files/big.bin" not in visible  # the interrupted upload is not visible
    assert f"artifacts/{artifact_id}/files/unrecorded.txt" in visible

    with store.writer("image_dataset", id=artifact_id) as w:
        assert set(w.existing()) == {"done.txt"}  # checkpointed; the rest is uploaded again
        w.put_bytes("big.bin", b"finished")
    m = store.get(artifact_id)
    assert [f.path for f in m.files] == ["big.bin", "done.txt"]
    assert store.read_bytes(artifact_id, "done.txt") == b"uploaded and checkpointed"
    files = {o.key for o in store.storage.list(f"artifacts/{artifact_id}/files/")}
    assert files == {f"artifacts/{artifact_id}/files/big.bin", f"artifacts/{artifact_id}/files/done.txt"}  # stray removed


def test_concurrent_reader_sees_no_artifact_or_a_complete_one(store: ArtifactStore) -> None:
    files = {f"shard-{i}.bin": bytes([i]) * (256 * 1024) for i in range(6)}
    artifact_id = store.new_id("image_dataset", "concurrent")
    stop = threading.Event()
    reading = threading.Event()
    states: list[str] = []
    bad: list[str] = []

    def reader() -> None:
        while True:
            last = stop.is_set()
            for listed in store.list():
                if {f.path for f in listed.files} != set(files):
                    bad.append(f"list showed a partial manifest: {[f.path for f in listed.files]}")
            try:
                m = store.get(artifact_id)
            except NotFound:
                states.append("absent")
            else:
                states.append("present")
                if {f.path for f in m.files} != set(files):
                    bad.append(f"partial manifest: {[f.path for f in m.files]}")
                for path, data in files.items():
                    if store.read_bytes(artifact_id, path) != data:
                        bad.append(f"wrong content in {path}")
            reading.set()
            if last:
                return

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(10)
    try:
        with store.writer("image_dataset", id=artifact_id) as w:
            for path, data in files.items():
                w.put_bytes(path, data)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not bad
    assert states[0] == "absent" and states[-1] == "present"
    assert states == sorted(states)  # absent... then present..., never back


def test_corrupted_file_is_detected_on_read_and_download(store: ArtifactStore, tmp_path: Path) -> None:
    m = publish(store, "expert", {"adapter.bin": b"good weights"})
    store.storage.put_bytes(f"artifacts/{m.id}/files/adapter.bin", b"evil weights")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        store.read_bytes(m.id, "adapter.bin")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        store.download(m.id, tmp_path / "dl")
    assert not (tmp_path / "dl" / "adapter.bin").exists()


def test_download_skips_files_already_present_and_current(store: ArtifactStore, tmp_path: Path) -> None:
    m = publish(store, "merged_model", {"unet/w.bin": b"unet", "vae/w.bin": b"vae"})
    dest = store.download(m.id, tmp_path / "model")
    stamp = (dest / "unet" / "w.bin").stat().st_mtime_ns
    (dest / "vae" / "w.bin").write_bytes(b"stale")
    store.download(m.id, dest)
    assert (dest / "unet" / "w.bin").stat().st_mtime_ns == stamp
    assert (dest / "vae" / "w.bin").read_bytes() == b"vae"


def test_alias_points_at_an_artifact_and_is_replaced_atomically(store: ArtifactStore) -> None:
    v1 = publish(store, "merged_model", {"w": b"1"})
    v2 = publish(store, "merged_model", {"w": b"2"})
    with pytest.raises(NotFound):
        store.set_alias("current", "merged-model-missing")
    store.set_alias("current", v1.id)
    assert store.resolve("current") == v1
    store.set_alias("current", v2.id)
    assert store.get_alias("current").artifact_id == v2.id
    assert store.resolve(v1.id) == v1
    assert [a.name for a in store.list_aliases()] == ["current"]
    store.delete_alias("current")
    with pytest.raises(NotFound):
        store.resolve("current")
    with pytest.raises(InvalidArgument):
        store.set_alias("Bad Name", v1.id)


def test_delete_unpublishes_then_removes_files(store: ArtifactStore) -> None:
    m = publish(store, "eval_report", {"report.json": b"{}"})
    store.delete(m.id)
    assert not store.exists(m.id)
    assert store.storage.list(f"artifacts/{m.id}/") == []


def test_store_on_a_missing_bucket_lists_nothing(make_settings: Callable[..., SelmaSettings], s3_server: str) -> None:
    store = ArtifactStore(open_storage(make_settings(storage_uri="s3://selma-never-created", s3_endpoint=s3_server)))
    assert store.list() == [] and store.list_aliases() == []
    with pytest.raises(NotFound):
        store.get("expert-1")
