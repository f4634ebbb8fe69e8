"""RenderService over gRPC: a real server on 127.0.0.1 with S3 (moto) storage, and a server process
killed with SIGKILL mid-job whose job a restarted server finishes without rendering any image twice."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import _processes
import grpc
import pytest
from prometheus_client import REGISTRY

from selma.artifacts import ArtifactStore
from selma.server import wait_for_serving
from selma.storage import open_storage
from selma.v1 import common_pb2, render_service_pb2, render_service_pb2_grpc
from selma_render.renderer import Renderer
from selma_render.server import SERVICE_NAME, build_server
from selma_render.settings import RenderSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 2


def render_settings(base, **overrides) -> RenderSettings:  # noqa: ANN001
    return RenderSettings(**{**base.model_dump(), **overrides})


def make_prompt_set(store: ArtifactStore, n: int) -> str:
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} green apples", "skill": "count"} for i in range(n)]
    with store.writer("prompt_set", key=f"ps-{uuid.uuid4().hex}", labels={"selma.dev/skill": "count"}, parameters={"skill": "count"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return w.manifest.id


def dataset_spec(model: Path | str, prompt_set: str, **settings) -> render_service_pb2.DatasetRenderSpec:
    return render_service_pb2.DatasetRenderSpec(
        run="run-1",
        prompt_set=common_pb2.ArtifactRef(id=prompt_set, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
        settings=render_service_pb2.RenderSettings(
            model=common_pb2.ModelRef(source=str(model)),
            diffusion=common_pb2.DiffusionSettings(steps=STEPS, scheduler=common_pb2.SCHEDULER_DDIM),
            **settings,
        ),
        labels={"team": "vision"},
    )


def watch_to_end(stub: render_service_pb2_grpc.RenderServiceStub, job_id: str) -> list[render_service_pb2.DatasetRenderJob]:
    updates = [u.job for u in stub.WatchDatasetRender(render_service_pb2.WatchDatasetRenderRequest(job_id=job_id), timeout=120)]
    assert updates, "watch sent nothing"
    return updates


@pytest.fixture
def s3_render(make_settings, s3_server, tiny_models, tmp_path) -> Iterator[tuple[render_service_pb2_grpc.RenderServiceStub, ArtifactStore, RenderSettings]]:
    settings = render_settings(
        make_settings(storage_uri=f"s3://selma-render-{uuid.uuid4().hex[:12]}/root", s3_endpoint=f"http://{s3_server}"),
        render_default_model=str(tiny_models.sd),
        render_max_resolution=512,
        model_allowed_dirs=f"{tiny_models.sd.parent},{tmp_path}",  # requests name the tiny models and test dirs by path
    )
    server = build_server(settings).start()
    server.core.warm_up()
    server.set_ready(True)
    try:
        wait_for_serving(server.address, SERVICE_NAME, timeout=30)
        with grpc.insecure_channel(server.address) as channel:
            yield render_service_pb2_grpc.RenderServiceStub(channel), server.core.store, settings
    finally:
        server.stop(grace=1)


def test_dataset_render_end_to_end_over_grpc_on_s3(s3_render, tiny_models, tmp_path):
    stub, store, _ = s3_render
    assert store.uri.startswith("s3://")
    rendered_before = REGISTRY.get_sample_value("selma_render_images_total", {"source": "dataset"}) or 0.0
    ps = make_prompt_set(store, 3)
    # the model too comes from S3: an s3:// prefix holding a save_pretrained layout, mirrored once
    for path in sorted(p for p in tiny_models.sdxl.rglob("*") if p.is_file()):
        store.storage.put_file(f"models/tiny-sdxl/{path.relative_to(tiny_models.sdxl).as_posix()}", path)
    model_uri = store.storage.uri_for("models/tiny-sdxl")
    spec = dataset_spec(model_uri, ps, images_per_prompt=2, batch_size=4, base_seed=3)
    start = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="run-1/render/count", spec=spec))
    assert start.created and start.job.status.job_id
    job_id = start.job.status.job_id
    assert start.job.spec.settings.batch_size == 4 and start.job.spec.skill == "count"

    updates = watch_to_end(stub, job_id)
    final = updates[-1]
    assert final.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, final.status.message
    assert final.status.progress.done == final.status.progress.total == 6
    assert final.stats.images_done == 6 and final.stats.prompts_total == 3 and final.stats.current_batch_size == 4
    assert final.stats.scheduler_resolved == common_pb2.SCHEDULER_DDIM
    assert final.stats.model_resolved.source == model_uri
    assert final.status.output.kind == common_pb2.ARTIFACT_KIND_IMAGE_DATASET and final.status.output.uri.startswith("s3://")

    # a repeat start returns the finished job; the same key with another spec is refused
    again = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="run-1/render/count", spec=spec))
    assert not again.created and again.job.status.job_id == job_id
    other = render_service_pb2.DatasetRenderSpec()
    other.CopyFrom(spec)
    other.settings.base_seed = 4
    with pytest.raises(grpc.RpcError) as e:
        stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="run-1/render/count", spec=other))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

    got = stub.GetDatasetRender(render_service_pb2.GetDatasetRenderRequest(job_id=job_id)).job
    assert got.status.output.id == final.status.output.id
    listed = stub.ListDatasetRenders(render_service_pb2.ListDatasetRendersRequest(filter=common_pb2.JobFilter(run="run-1", labels={"team": "vision"})))
    assert [j.status.job_id for j in listed.jobs] == [job_id]
    assert not stub.ListDatasetRenders(render_service_pb2.ListDatasetRendersRequest(filter=common_pb2.JobFilter(run="other"))).jobs
    cancelled = stub.CancelDatasetRender(render_service_pb2.CancelDatasetRenderRequest(job_id=job_id)).job
    assert cancelled.status.phase == common_pb2.JOB_PHASE_SUCCEEDED  # finished jobs are returned unchanged

    assert REGISTRY.get_sample_value("selma_render_images_total", {"source": "dataset"}) == rendered_before + 6
    assert REGISTRY.get_sample_value("selma_render_image_seconds_count", {"source": "dataset"}) >= 6
    assert REGISTRY.get_sample_value("selma_render_model_load_seconds_count") >= 1
    assert REGISTRY.get_sample_value("selma_render_queue_length") == 0

    manifest = store.get(final.status.output.id)
    assert manifest.parents == (ps,) and manifest.labels["selma.dev/skill"] == "count" and manifest.labels["selma.dev/run"] == "run-1"
    root = store.download(manifest, tmp_path / "dataset")
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in rows) == sorted(p.relative_to(root).as_posix() for p in (root / "images").glob("*.png"))
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6 and ds[0]["text"] == "1 green apples" and ds[0]["image"].size == (64, 64)


def test_preview_returns_pngs_and_reproduces_with_the_reported_seed(s3_render):
    stub, store, _ = s3_render
    before = {m.id for m in store.list()}
    req = render_service_pb2.PreviewRequest(
        prompts=["a red cube", "two dogs"],
        settings=render_service_pb2.RenderSettings(diffusion=common_pb2.DiffusionSettings(steps=STEPS), images_per_prompt=2),
    )
    resp = stub.Preview(req)  # model.source unset: the service default (tiny SD)
    assert [(i.prompt_index, i.image_index) for i in resp.images] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(i.png.startswith(b"\x89PNG\r\n\x1a\n") and (i.width, i.height) == (64, 64) for i in resp.images)
    assert resp.scheduler_resolved == common_pb2.SCHEDULER_PNDM and resp.render_time.ToNanoseconds() > 0
    one = resp.images[3]
    again = stub.Preview(
        render_service_pb2.PreviewRequest(
            prompts=[one.prompt],
            settings=render_service_pb2.RenderSettings(
                diffusion=common_pb2.DiffusionSettings(steps=STEPS), seed_policy=common_pb2.SEED_POLICY_FIXED, base_seed=one.seed
            ),
        )
    )
    assert again.images[0].png == one.png
    assert {m.id for m in store.list()} == before  # previews store nothing


def test_bad_requests_get_the_right_status_and_name_the_field(s3_render, tiny_models, tmp_path):
    stub, store, _ = s3_render
    ps = make_prompt_set(store, 1)

    def start_code(spec: render_service_pb2.DatasetRenderSpec, key: str = "k") -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as e:
            stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key=key, spec=spec))
        return e.value.code(), e.value.details()

    bad = dataset_spec(tiny_models.sd, ps)
    bad.settings.diffusion.width = 60
    code, details = start_code(bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.settings.diffusion.width" in details
    big = dataset_spec(tiny_models.sd, ps)
    big.settings.diffusion.height = 1024
    code, details = start_code(big)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "512" in details
    steps = dataset_spec(tiny_models.sd, ps)
    steps.settings.diffusion.steps = 1000
    assert "spec.settings.diffusion.steps" in start_code(steps)[1]
    guidance = dataset_spec(tiny_models.sd, ps)
    guidance.settings.diffusion.guidance_scale = 99
    assert "guidance_scale" in start_code(guidance)[1]
    missing = dataset_spec(tiny_models.sd, "prompt-set-00000000000000000000")
    code, details = start_code(missing)
    assert code == grpc.StatusCode.NOT_FOUND and "spec.prompt_set.id" in details
    no_model = dataset_spec(tmp_path / "no-such-model", ps)
    assert start_code(no_model)[0] == grpc.StatusCode.NOT_FOUND
    (tmp_path / "not-a-model").mkdir()
    assert start_code(dataset_spec(tmp_path / "not-a-model", ps))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert start_code(dataset_spec(tiny_models.sd, ps), key="")[0] == grpc.StatusCode.INVALID_ARGUMENT

    ok = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="v", spec=dataset_spec(tiny_models.sd, ps), validate_only=True))
    assert not ok.created and not ok.job.status.job_id and ok.job.spec.settings.diffusion.steps == STEPS
    assert not stub.ListDatasetRenders(render_service_pb2.ListDatasetRendersRequest()).jobs

    with pytest.raises(grpc.RpcError) as e:
        stub.Preview(render_service_pb2.PreviewRequest(prompts=["a"] * 5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDatasetRender(render_service_pb2.GetDatasetRenderRequest(job_id="dataset-render-0000"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# The child: a render server whose pipeline blocks forever after rendering its third batch
# (before storing it), announcing each call's seeds, so the parent can SIGKILL it mid-batch.
CHILD = textwrap.dedent(
    """
    import sys, threading
    import torch
    torch.set_num_threads(1)
    from selma_render.renderer import Renderer
    from selma_render.server import build_server
    from selma_render.settings import RenderSettings

    inner = Renderer.generate
    calls = []

    def generate(self, model, r, prompts, seeds):
        images = inner(self, model, r, prompts, seeds)
        calls.append(seeds)
        print("rendered", *seeds, flush=True)
        if len(calls) == 3:
            print("blocked", flush=True)
            threading.Event().wait()
        return images

    Renderer.generate = generate
    server = build_server(RenderSettings()).start()
    server.set_ready(True)
    print("address", server.address, flush=True)
    threading.Event().wait()
    """
)


class LineReader:
    """Lines of a child's stdout through a reader thread (select() on a buffered pipe can miss lines)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:  # noqa: ANN001
        for raw in iter(stream.readline, b""):
            self.lines.put(raw.decode().strip())
        self.lines.put("")  # EOF: the child exited

    def next(self, timeout: float = 120) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("the child server said nothing in time")
        assert line, "the child server exited early (its log is in the test's tmp dir)"
        return line


def test_server_killed_mid_job_resumes_after_restart_without_rendering_twice(make_settings, tiny_models, tmp_path, monkeypatch):
    settings = render_settings(make_settings(), model_allowed_dirs=str(tiny_models.sd.parent))
    store = ArtifactStore(open_storage(settings))
    ps = make_prompt_set(store, 6)
    spec = dataset_spec(tiny_models.sd, ps, images_per_prompt=2, batch_size=2)  # 12 images, 6 batches

    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    env.update(SELMA_DATA_DIR=str(settings.data_dir), SELMA_STORAGE_URI=settings.storage_uri, OMP_NUM_THREADS="1", SELMA_LOG_LEVEL="WARNING",
               SELMA_MODEL_ALLOWED_DIRS=settings.model_allowed_dirs)
    with (tmp_path / "child.log").open("wb") as log_file:
        proc = _processes.popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=log_file, env=env)
    reader = LineReader(proc)
    try:
        line = reader.next()
        assert line.startswith("address "), line
        with grpc.insecure_channel(line.split()[1]) as channel:
            stub = render_service_pb2_grpc.RenderServiceStub(channel)
            job_id = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="killme", spec=spec)).job.status.job_id
        rendered_calls = []
        while (line := reader.next()) != "blocked":
            rendered_calls.append([int(s) for s in line.split()[1:]])
        os.kill(proc.pid, signal.SIGKILL)  # mid-batch: the third batch was rendered but never stored
        proc.wait(timeout=30)
    finally:
        _processes.stop_tree(proc, first=signal.SIGKILL)
        reader.thread.join(timeout=10)
        proc.stdout.close()
    stored_before = {s for call in rendered_calls[:2] for s in call}
    lost_batch = set(rendered_calls[2])
    assert len(stored_before) == 4 and len(lost_batch) == 2
    assert not store.list("image_dataset"), "the killed job must not have published a partial dataset"

    # restart: a new server on the same storage re-queues the job and renders only what is missing
    resumed: list[int] = []
    inner = Renderer.generate

    def counting(self, model, r, prompts, seeds):  # noqa: ANN001, ANN202
        resumed.extend(seeds)
        return inner(self, model, r, prompts, seeds)

    monkeypatch.setattr(Renderer, "generate", counting)
    server = build_server(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            final = watch_to_end(render_service_pb2_grpc.RenderServiceStub(channel), job_id)[-1]
    finally:
        server.stop(grace=1)
    assert final.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, final.status.message
    assert final.stats.images_skipped_existing == 4 and final.stats.images_done == 12
    assert not stored_before & set(resumed), "an image that was already stored was rendered again"
    assert lost_batch <= set(resumed) and len(resumed) == 8

    manifest = store.get(final.status.output.id)
    rows = [json.loads(x) for x in store.read_bytes(manifest, "metadata.jsonl").decode().splitlines()]
    names = [r["file_name"] for r in rows]
    assert len(names) == len(set(names)) == 12
    assert sorted(f.path for f in manifest.files) == sorted([*names, "metadata.jsonl"])
    assert {r["seed"] for r in rows} == stored_before | set(resumed)

    # and the resumed dataset is byte-identical to an uninterrupted render of the same spec
    monkeypatch.setattr(Renderer, "generate", inner)
    server = build_server(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = render_service_pb2_grpc.RenderServiceStub(channel)
            ref_id = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key="reference", spec=spec)).job.status.job_id
            reference = watch_to_end(stub, ref_id)[-1]
    finally:
        server.stop(grace=1)
    assert store.get(reference.status.output.id).digest == manifest.digest
