"""Pipeline loading shared by render, training and serving: references, devices, schedulers, mirrors."""

from __future__ import annotations

import pytest
import torch

from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.pipelines import (
    SCHEDULERS,
    ModelSpec,
    PipelineCache,
    load_pipeline,
    make_scheduler,
    resolve_device,
    resolve_dtype,
)
from selma.storage import open_storage

pytestmark = pytest.mark.slow


def test_local_path_loads_through_auto_pipeline_and_generates(tiny_models, make_settings):
    settings = make_settings()
    pipe = load_pipeline(ModelSpec(str(tiny_models.sd)), settings)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    img = pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_name_builds_a_fresh_scheduler(tiny_models, make_settings, name):
    pipe = PipelineCache(make_settings()).get(ModelSpec(str(tiny_models.sd)))
    sch = make_scheduler(pipe, name)
    assert type(sch).__name__ == SCHEDULERS[name][0]
    assert sch is not pipe.scheduler
    assert make_scheduler(pipe, "") is not pipe.scheduler


def test_unknown_scheduler_names_the_choices(tiny_models, make_settings):
    pipe = PipelineCache(make_settings()).get(ModelSpec(str(tiny_models.sd)))
    with pytest.raises(InvalidArgument, match="ddim"):
        make_scheduler(pipe, "warp-drive")


def test_cache_reuses_loaded_pipeline(tiny_models, make_settings):
    cache = PipelineCache(make_settings(), max_models=1)
    a = cache.get(ModelSpec(str(tiny_models.sd)))
    assert cache.get(ModelSpec(str(tiny_models.sd))) is a
    cache.get(ModelSpec(str(tiny_models.sdxl)))  # evicts the SD pipeline
    assert cache.get(ModelSpec(str(tiny_models.sd))) is not a


def test_storage_prefix_is_mirrored_once_and_pickles_are_never_fetched(tiny_models, storage_settings):
    storage = open_storage(storage_settings)
    for path in sorted(p for p in tiny_models.sd.rglob("*") if p.is_file()):
        storage.put_file(f"models/tiny-sd/{path.relative_to(tiny_models.sd).as_posix()}", path)
    storage.put_bytes("models/tiny-sd/unet/diffusion_pytorch_model.bin", b"not really a pickle")
    uri = storage.uri_for("models/tiny-sd")
    pipe = load_pipeline(ModelSpec(uri), storage_settings)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    mirrors = list((storage_settings.resolved_model_cache_dir / "mirror").iterdir())
    assert len(mirrors) == 1
    assert not list(mirrors[0].rglob("*.bin"))
    # second load uses the mirror: deleting the source does not matter any more
    storage.delete_prefix("models/")
    assert type(load_pipeline(ModelSpec(uri), storage_settings)).__name__ == "StableDiffusionPipeline"


def test_bad_references_say_what_to_fix(make_settings, tmp_path):
    settings = make_settings(hf_offline=True)
    with pytest.raises(InvalidArgument):
        ModelSpec("  ")
    with pytest.raises(NotFound):
        load_pipeline(ModelSpec(str(tmp_path / "missing")), settings)
    with pytest.raises(FailedPrecondition, match="cannot load model"):
        load_pipeline(ModelSpec("no-such-org/no-such-model"), settings)


def test_device_and_precision_resolution(make_settings):
    settings = make_settings()
    cpu = resolve_device("cpu", settings)
    assert cpu.type == "cpu"
    assert resolve_dtype("", cpu, settings) == torch.float32
    assert resolve_dtype("bf16", cpu, settings) == torch.bfloat16
    with pytest.raises(InvalidArgument, match="fp16"):
        resolve_dtype("fp16", cpu, settings)
    with pytest.raises(InvalidArgument):
        resolve_device("tpu", settings)
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="CUDA"):
            resolve_device("cuda", settings)


def test_tiny_scheme_builds_and_loads_the_offline_models(make_settings):
    settings = make_settings()
    pipe = load_pipeline(ModelSpec("tiny://sdxl"), settings)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (settings.resolved_model_cache_dir / "tiny" / "seed-0" / "tiny-sdxl" / "model_index.json").is_file()
    with pytest.raises(InvalidArgument, match="tiny://sd"):
        load_pipeline(ModelSpec("tiny://flux"), settings)
    with pytest.raises(InvalidArgument, match="seed"):
        load_pipeline(ModelSpec("tiny://sd?steps=3"), settings)


def test_imports_are_a_start_up_phase_not_part_of_a_model_load(tiny_models, make_settings, monkeypatch):
    """Model-load metrics must measure loading: the first load used to include the diffusers imports.
    A service calls import_libraries() before it starts its model-load timer; the imports are reported
    once as selma_startup_phase_seconds{phase="imports"}, and a later load never imports again."""
    from prometheus_client import REGISTRY

    from selma import pipelines

    pipelines.import_libraries()
    imports = REGISTRY.get_sample_value("selma_startup_phase_seconds", {"phase": "imports"})
    assert imports is not None and imports >= 0
    calls: list[int] = []
    monkeypatch.setattr(pipelines._imported, "set", lambda: calls.append(1))  # a second import pass would call it
    pipelines.import_libraries()
    load_pipeline(ModelSpec(str(tiny_models.sd)), make_settings())
    assert calls == []
    assert REGISTRY.get_sample_value("selma_startup_phase_seconds", {"phase": "imports"}) == imports
    assert REGISTRY.get_sample_value("selma_startup_phase_seconds", {"phase": "model_materialize"}) is not None
