"""Dataset renders on the tiny SD and SDXL pipelines through the render core (no gRPC):
imagefolder layout and lineage, reproducibility, resume without re-rendering, out-of-memory back-off."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from selma.artifacts import ArtifactStore
from selma.errors import InvalidArgument, NotFound
from selma.jobs import JobPhase, JobRecord
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import RenderCore
from selma_render.dataset import reproduce_image
from selma_render.renderer import Renderer
from selma_render.settings import RenderSettings

pytestmark = pytest.mark.slow

STEPS = 2


@pytest.fixture
def settings(make_settings) -> RenderSettings:
    return RenderSettings(**make_settings().model_dump(), render_max_resolution=256)


@pytest.fixture
def core(settings) -> Iterator[RenderCore]:
    c = RenderCore(settings)
    yield c
    c.shutdown()


def make_prompt_set(store: ArtifactStore, n: int, *, key: str = "prompts", skill: str = "count") -> str:
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} red cubes on a table", "skill": skill} for i in range(n)]
    with store.writer("prompt_set", key=key, labels={"selma.dev/skill": skill, "selma.dev/run": "r1"}, parameters={"skill": skill, "count": n}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return w.manifest.id


def spec(model: Path, prompt_set: str, **settings) -> render_service_pb2.DatasetRenderSpec:
    diffusion = common_pb2.DiffusionSettings(steps=STEPS, scheduler=settings.pop("scheduler", common_pb2.SCHEDULER_UNSPECIFIED))
    return render_service_pb2.DatasetRenderSpec(
        run="r1",
        prompt_set=common_pb2.ArtifactRef(id=prompt_set, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
        settings=render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source=str(model)), diffusion=diffusion, **settings),
    )


def run_to_end(core: RenderCore, key: str, s: render_service_pb2.DatasetRenderSpec) -> JobRecord:
    rec, _, _ = core.start(key, s)
    *_, rec = core.jobs.watch(rec.job_id)  # the last update is terminal
    return rec


class Recorder:
    """Wraps Renderer.generate on one core: records the seeds of every pipeline call, can inject faults."""

    def __init__(self, core: RenderCore, fault=None) -> None:  # noqa: ANN001
        self.calls: list[list[int]] = []
        self.fault = fault
        inner = core.renderer.generate

        def generate(model, r, prompts, seeds):  # noqa: ANN001, ANN202
            if self.fault is not None:
                self.fault(len(self.calls), seeds)
            out = inner(model, r, prompts, seeds)
            self.calls.append(list(seeds))
            return out

        core.renderer.generate = generate  # type: ignore[method-assign]

    @property
    def seeds(self) -> list[int]:
        return [s for call in self.calls for s in call]


def assert_imagefolder(root: Path, expected: int) -> list[dict]:
    """The rules `datasets`' imagefolder applies to metadata.jsonl, then a real load when `datasets` is installed."""
    meta = root / "metadata.jsonl"
    assert meta.is_file(), "metadata.jsonl must sit at the dataset root"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    names = [r["file_name"] for r in rows]
    assert len(rows) == expected and len(set(names)) == expected
    assert all(not n.startswith("/") and (root / n).is_file() for n in names)
    on_disk = {p.relative_to(root).as_posix() for p in (root / "images").rglob("*.png")}
    assert on_disk == set(names), "every image has exactly one metadata row"
    assert all("image" not in r for r in rows)  # would clash with imagefolder's image column
    assert len({tuple(sorted(r)) for r in rows}) == 1, "every row has the same columns"
    try:
        import datasets
    except ImportError:
        return rows
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(root.parent / "hf-cache"))
    assert ds.num_rows == expected
    assert {"image", "text", "prompt_id", "seed"} <= set(ds.column_names)
    assert ds[0]["image"].size == (rows[0]["width"], rows[0]["height"])
    return rows


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_dataset_renders_in_imagefolder_layout_with_lineage(core, tiny_models, tmp_path, which):
    ps = make_prompt_set(core.store, 3)
    # 3 prompts x 2 images at batch size 4: the last batch holds 2 images and must be rendered
    rec = run_to_end(core, f"render-{which}", spec(getattr(tiny_models, which), ps, images_per_prompt=2, batch_size=4, base_seed=11))
    assert rec.phase == JobPhase.SUCCEEDED, rec.message
    assert rec.progress.done == rec.progress.total == 6 and rec.progress.unit == "images"
    st = rec.stats
    assert st["images_done"] == 6 and st["images_total"] == 6 and st["prompts_total"] == 3 and st["current_batch_size"] == 4
    assert st["scheduler_resolved"] == ("SCHEDULER_PNDM" if which == "sd" else "SCHEDULER_EULER")

    manifest = core.store.get(rec.output.id)
    assert manifest.kind.value == "image_dataset" and manifest.parents == (ps,)
    assert manifest.labels["selma.dev/run"] == "r1" and manifest.labels["selma.dev/skill"] == "count"
    assert manifest.parameters["prompt_set"] == ps and manifest.parameters["steps"] == STEPS
    assert [m.id for m in core.store.lineage(manifest.id)] == [manifest.id, ps]

    rows = assert_imagefolder(core.store.download(manifest, tmp_path / "ds"), expected=6)
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [(p, i) for p in range(3) for i in range(2)]
    first = rows[0]
    assert first["file_name"] == "images/000000-0.png" and first["text"] == "1 red cubes on a table" and first["prompt_id"] == "p000000"
    assert first["model"] == str(getattr(tiny_models, which)) and first["steps"] == STEPS
    assert first["guidance_scale"] == (7.5 if which == "sd" else 5.0) and (first["width"], first["height"]) == (64, 64)
    assert len({r["seed"] for r in rows}) == 6


def test_same_seed_gives_identical_png_bytes_and_preview_reproduces_an_image(core, tiny_models):
    ps = make_prompt_set(core.store, 3)
    s = spec(tiny_models.sd, ps, images_per_prompt=2, batch_size=1, base_seed=5, scheduler=common_pb2.SCHEDULER_DDIM)
    a = core.store.get(run_to_end(core, "a", s).output.id)
    b = core.store.get(run_to_end(core, "b", s).output.id)
    assert a.id != b.id
    assert [(f.path, f.sha256) for f in a.files] == [(f.path, f.sha256) for f in b.files]
    s.settings.base_seed = 6
    c = core.store.get(run_to_end(core, "c", s).output.id)
    assert a.file("images/000000-0.png").sha256 != c.file("images/000000-0.png").sha256

    row = json.loads(core.store.read_bytes(a, "metadata.jsonl").decode().splitlines()[3])
    preview = core.preview(
        [row["text"]],
        render_service_pb2.RenderSettings(
            model=common_pb2.ModelRef(source=str(tiny_models.sd)),
            diffusion=common_pb2.DiffusionSettings(steps=STEPS, scheduler=common_pb2.SCHEDULER_DDIM),
            seed_policy=common_pb2.SEED_POLICY_FIXED,
            base_seed=row["seed"],
        ),
    )
    assert preview.images[0].seed == row["seed"]
    assert preview.images[0].png == core.store.read_bytes(a, row["file_name"])


def test_cancelled_job_resumes_without_rendering_any_image_twice(core, tiny_models):
    ps = make_prompt_set(core.store, 5)
    s = spec(tiny_models.sd, ps, images_per_prompt=2, batch_size=3)  # 10 images: batches of 3, 3, 3, 1
    job_id = core.start("resume", s)[0].job_id

    def cancel_after_two_batches(calls_so_far: int, _seeds: list[int]) -> None:
        if calls_so_far == 2:
            core.jobs.cancel(job_id, "test")  # takes effect at the next batch boundary

    first = Recorder(core, fault=cancel_after_two_batches)
    rec = list(core.jobs.watch(job_id))[-1]
    assert rec.phase == JobPhase.CANCELLED
    assert len(first.calls) == 3 and rec.output is None  # the batch in flight finished and was stored
    assert not core.store.list("image_dataset"), "a partial dataset is never published"

    first_seeds = list(first.seeds)
    second = Recorder(core)  # wraps the first recorder; only its own list matters from here on
    rec, _, created = core.start("resume", s)
    assert created and rec.attempt == 2
    rec = list(core.jobs.watch(job_id))[-1]
    assert rec.phase == JobPhase.SUCCEEDED, rec.message
    assert rec.stats["images_skipped_existing"] == 9
    assert not set(first_seeds) & set(second.seeds), "an image was rendered twice"
    manifest = core.store.get(rec.output.id)
    rows = [json.loads(x) for x in core.store.read_bytes(manifest, "metadata.jsonl").decode().splitlines()]
    assert sorted(first_seeds + second.seeds) == sorted(r["seed"] for r in rows)
    assert len(manifest.files) == 11


def test_restart_after_shutdown_resumes_in_a_new_process(settings, tiny_models):
    core = RenderCore(settings)
    ps = make_prompt_set(core.store, 6)
    s = spec(tiny_models.sdxl, ps, batch_size=2)  # three batches
    stopping = threading.Event()

    def shut_down_during_second_batch(calls_so_far: int, _seeds: list[int]) -> None:
        if calls_so_far == 1:
            core.jobs.shutdown(wait=False)  # as on SIGTERM: the job stops at the next batch boundary
            stopping.set()

    first = Recorder(core, fault=shut_down_during_second_batch)
    job_id = core.start("shutdown", s)[0].job_id
    assert stopping.wait(60)
    core.shutdown()  # waits for the job to stop
    assert core.jobs.get(job_id).phase == JobPhase.PENDING  # resumable, not failed
    assert not core.store.list("image_dataset")

    again = RenderCore(settings)  # what a restarted service does
    second = Recorder(again)
    assert again.recover() == [job_id]
    rec = list(again.jobs.watch(job_id))[-1]
    again.shutdown()
    assert rec.phase == JobPhase.SUCCEEDED, rec.message
    assert len(first.seeds) == 4 and len(second.seeds) == 2 and not set(first.seeds) & set(second.seeds)
    assert rec.attempt == 1 and rec.stats["images_skipped_existing"] == 4


def test_out_of_memory_halves_the_batch_and_keeps_going(core, tiny_models):
    ps = make_prompt_set(core.store, 3)

    def oom_above_one(_calls: int, seeds: list[int]) -> None:
        if len(seeds) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    rec_ = Recorder(core, fault=oom_above_one)
    rec = run_to_end(core, "oom", spec(tiny_models.sd, ps, images_per_prompt=2, batch_size=4))
    assert rec.phase == JobPhase.SUCCEEDED, rec.message
    assert rec.stats["current_batch_size"] == 1 and rec.stats["oom_retries"] == 2  # 4 -> 2 -> 1
    assert any("out of memory" in w for w in rec.warnings)
    assert len(rec_.seeds) == 6 and len(set(rec_.seeds)) == 6


def test_out_of_memory_at_batch_one_fails_resource_exhausted_and_keeps_work(core, tiny_models):
    ps = make_prompt_set(core.store, 3)
    s = spec(tiny_models.sd, ps, batch_size=1)

    def oom_from_third_call(calls: int, _seeds: list[int]) -> None:
        if calls >= 2:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    first = Recorder(core, fault=oom_from_third_call)
    rec = run_to_end(core, "oom-fail", s)
    assert rec.phase == JobPhase.FAILED
    assert rec.error.code == "RESOURCE_EXHAUSTED" and "kept" in rec.error.message
    first.fault = None  # the device has room again: the same key resumes
    rec, _, _ = core.start("oom-fail", s)
    rec = list(core.jobs.watch(rec.job_id))[-1]
    assert rec.phase == JobPhase.SUCCEEDED and rec.stats["images_skipped_existing"] == 2
    assert len(first.seeds) == 3


def test_model_that_fails_to_load_fails_the_job_with_failed_precondition(core, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models.sd, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    ps = make_prompt_set(core.store, 1)
    rec = run_to_end(core, "broken", spec(broken, ps))
    assert rec.phase == JobPhase.FAILED and rec.error.code == "FAILED_PRECONDITION"
    assert "cannot load model" in rec.error.message


def test_v_prediction_model_renders_with_its_scheduler_config(core, tiny_models, tmp_path):
    vpred = tmp_path / "tiny-sd-v"
    shutil.copytree(tiny_models.sd, vpred)
    cfg_path = vpred / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    settings = render_service_pb2.RenderSettings(
        model=common_pb2.ModelRef(source=str(vpred)),
        diffusion=common_pb2.DiffusionSettings(steps=STEPS, scheduler=common_pb2.SCHEDULER_DDIM, width=32, height=48),
        images_per_prompt=2,
    )
    result = core.preview(["a cat"], settings)
    assert [(i.width, i.height) for i in result.images] == [(32, 48)] * 2
    pipe = result.model.pipe
    assert Renderer.pipeline_view(pipe, "ddim").scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.__class__.__name__ == "PNDMScheduler"  # the cached pipeline is never modified


def test_any_dataset_image_can_be_re_rendered_exactly(core, settings, tiny_models, monkeypatch, capsys):
    ps = make_prompt_set(core.store, 3)
    rec = run_to_end(core, "repro", spec(tiny_models.sd, ps, images_per_prompt=2, batch_size=4, scheduler=common_pb2.SCHEDULER_DDIM))
    for name in ("images/000001-1.png", "images/000002-0.png"):  # the middle of the first batch, the short last batch
        result = reproduce_image(core.store, core.renderer, rec.output.id, name)
        assert result.identical, name
    with pytest.raises(NotFound):
        reproduce_image(core.store, core.renderer, rec.output.id, "images/000009-0.png")

    for key, value in {"SELMA_DATA_DIR": str(settings.data_dir), "SELMA_STORAGE_URI": settings.storage_uri}.items():
        monkeypatch.setenv(key, value)
    from selma.app.cli import main

    assert main(["render", "reproduce", rec.output.id, "images/000000-1.png"]) == 0
    assert "identical" in capsys.readouterr().out


def test_sizes_over_the_models_own_maximum_are_refused_before_rendering(core, tiny_models):
    """The tiny model is 64 px native: 2x (SELMA_RENDER_MAX_SIZE_FACTOR) is its maximum, under SELMA_RENDER_MAX_RESOLUTION=256."""
    settings = render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source=str(tiny_models.sd)),
                                                 diffusion=common_pb2.DiffusionSettings(steps=STEPS, width=256, height=64))
    with pytest.raises(InvalidArgument) as e:
        core.preview(["a red cube"], settings)
    assert e.value.field == "settings.diffusion.width" and "SELMA_RENDER_MAX_SIZE_FACTOR=2" in str(e.value)
    settings.diffusion.width = 128
    (image,) = core.preview(["a red cube"], settings).images
    assert (image.width, image.height) == (128, 64)
