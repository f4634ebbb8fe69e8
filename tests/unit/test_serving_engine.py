"""Merging and serving on the tiny SD pipeline with tiny experts: exactness against diffusers,
fused vs unfused, exports, concurrency, queueing, cancellation and validation."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_st

from selma.artifacts import ArtifactKind
from selma.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from selma.jobs import JobPhase
from selma_serving.core import ServingCore
from selma_serving.engine import Admission, GenerationRequest, fused_copy
from selma_serving.lora import DIFFUSERS_FILE, FUSED_FILE, MERGE_JSON, load_expert
from selma_serving.merge import ExpertWeight, MergeParams
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-engine")
    sd = str(tiny_models.sd)
    settings = ServingSettings(
        data_dir=root / "data",
        storage_uri=(root / "storage").as_uri(),
        serving_base_model=sd,
        serving_max_steps=50,
        serving_max_resolution=128,
        serving_max_concurrent=4,
        serving_max_queue=8,
        # batching off: these tests hold concurrent requests to the bytes of sequential ones
        # (batched images match solo ones within a pixel tolerance: tests/unit/test_serving_batching.py)
        serving_max_batch_size=1,
    )
    core = ServingCore(settings)
    core.start()
    ex = {
        "a": make_expert(core.store, sd, seed=1, rank=4, alpha=8, skill="a"),
        "b": make_expert(core.store, sd, seed=2, rank=8, alpha=4, skill="b"),
        "c": make_expert(core.store, sd, seed=3, rank=4, skill="c"),
        "d": make_expert(core.store, sd, seed=4, rank=4, skill="d"),
    }
    yield SimpleNamespace(core=core, sd=sd, ex=ex, root=root)
    core.shutdown()


def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, ctx).sample


def rel_err(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref − base‖: error relative to the effect of the adapters."""
    return float((out - ref).norm() / (ref - base).norm())


def fresh_pipe(sd: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mix(*pairs, **kw) -> MergeParams:
    return MergeParams(experts=tuple(ExpertWeight(m.id, w) for m, w in pairs), **kw)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def hand_delta(core: ServingCore, manifest, module: str) -> torch.Tensor:
    """ΔW straight from the expert's files: (alpha/r)·up·down."""
    sd = load_st(core.store.read_bytes(manifest, DIFFUSERS_FILE))
    alpha = json.loads(core.store.read_bytes(manifest, "expert.json"))["alpha"]
    down, up = sd[f"unet.{module}.lora.down.weight"].double(), sd[f"unet.{module}.lora.up.weight"].double()
    return alpha / down.shape[0] * (up @ down)


def test_mean_delta_equals_hand_computed_weighted_sum(env):
    core, ex = env.core, env.ex
    adapters, rm = core.prepare_merge(mix((ex["a"], None), (ex["b"], None), (ex["c"], None)), for_serving=True)
    result = core.run_merge(adapters, rm)
    assert result.rank == 4 + 8 + 4
    for module, (A, B) in result.lora.items():
        expected = sum(hand_delta(core, ex[k], module) for k in "abc") / 3
        got = (B.double() @ A.double())
        assert float((got - expected).norm() / expected.norm()) < 1e-5, module


def test_mean_delta_equals_diffusers_set_adapters_and_fused_equals_unfused(env, tmp_path):
    core, ex = env.core, env.ex
    pipe = fresh_pipe(env.sd)
    base = unet_out(pipe.unet)
    for k in "cd":  # alpha = rank: diffusers files carry no alpha, so these load at their true scale
        pipe.load_lora_weights(str(core.store.download(ex[k].id, tmp_path / k)), weight_name=DIFFUSERS_FILE, adapter_name=k)
    pipe.set_adapters(["c", "d"], adapter_weights=[0.7, 0.2])
    unfused = unet_out(pipe.unet)
    unet, rm, _ = core.engine.mix_unet(mix((ex["c"], 0.7), (ex["d"], 0.2)))
    assert rm.weights == (0.7, 0.2)
    assert rel_err(unet_out(unet), unfused, base) < 1e-5
    # the service's base UNet is untouched by the mix
    assert torch.equal(unet_out(core.engine.base_unet), base)


def test_exported_merged_adapter_loads_in_diffusers_and_kohya_and_matches_fused(env, tmp_path):
    core, ex = env.core, env.ex
    rec, created = core.start_merge("test/export", {"model_name": "mix-abc", "merge": {"experts": [{"expert_id": ex[k].id} for k in "abc"]}})
    final = list(core.jobs.watch(rec.job_id, min_interval=0))[-1]
    assert final.phase == JobPhase.SUCCEEDED, final.error
    fused_unet, _ = core.registry.unet("mix-abc")
    fused = unet_out(fused_unet)
    base = unet_out(core.engine.base_unet)
    for fmt in ("diffusers", "kohya"):
        f = core.export(model_name="mix-abc", fmt=fmt)
        assert f.rank == 16
        keys = list(load_st(f.data))
        assert all(k.startswith("lora_unet_") for k in keys) if fmt == "kohya" else all(k.startswith("unet.") for k in keys)
        path = tmp_path / f.file_name
        path.write_bytes(f.data)
        pipe = fresh_pipe(env.sd)
        pipe.load_lora_weights(str(path), adapter_name="m")  # unfused LoRA
        assert rel_err(unet_out(pipe.unet), fused, base) < 1e-5, fmt
    # and a single expert exported in kohya format loads too, at its alpha/r scale
    f = core.export(expert_id=ex["a"].id, fmt="kohya")
    (tmp_path / "a.safetensors").write_bytes(f.data)
    pipe = fresh_pipe(env.sd)
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    alone, _, _ = core.engine.mix_unet(mix((ex["a"], 1.0)))
    assert rel_err(unet_out(pipe.unet), unet_out(alone), base) < 1e-5


def test_merge_job_publishes_lineage_and_serves_the_same_images_as_the_per_request_mix(env):
    core, ex = env.core, env.ex
    spec = {"model_name": "mix-ab", "load": True, "run": "r1", "merge": {"experts": [{"expert_id": ex["a"].id, "weight": 0.6}, {"expert_id": ex["b"].id, "weight": 0.4}]}}
    rec, created = core.start_merge("test/ab", spec)
    assert created
    final = list(core.jobs.watch(rec.job_id, min_interval=0))[-1]
    assert final.phase == JobPhase.SUCCEEDED, final.error
    assert final.stats["output_rank"] == 12 and final.stats["registered_model_name"] == "mix-ab"
    manifest = core.store.get(final.output.id)
    assert manifest.kind == ArtifactKind.MERGED_MODEL and set(manifest.parents) == {ex["a"].id, ex["b"].id}
    info = json.loads(core.store.read_bytes(manifest, MERGE_JSON))
    assert info["method"] == "mean_delta" and [e["weight"] for e in info["experts"]] == [0.6, 0.4]
    assert {m.id for m in core.lineage(manifest.id)} >= {manifest.id, ex["a"].id, ex["b"].id}
    assert core.registry.get("mix-ab").state == "LOADED"
    again, created_again = core.start_merge("test/ab", spec)  # same key, same spec: the same job
    assert not created_again and again.job_id == rec.job_id
    req = dict(prompts=["a cat"], steps=4, seed=3, scheduler="ddim")
    named = list(core.engine.generate(GenerationRequest(**req, model_name="mix-ab")))
    per_request = list(core.engine.generate(GenerationRequest(**req, merge=mix((ex["a"], 0.6), (ex["b"], 0.4)))))
    base = list(core.engine.generate(GenerationRequest(**req)))
    assert named[0].served.model_name == "mix-ab" and named[0].served.fused
    assert np.abs(pixels(named[0].png) - pixels(per_request[0].png)).max() <= 1
    assert np.abs(pixels(named[0].png) - pixels(base[0].png)).max() > 1


def test_fused_merge_job_stores_weights_and_has_no_adapter(env):
    core, ex = env.core, env.ex
    spec = {"model_name": "ties-cd", "merge": {"experts": [{"expert_id": ex["c"].id}, {"expert_id": ex["d"].id}], "method": "MERGE_METHOD_TIES", "fuse": True}}
    rec, _ = core.start_merge("test/ties-fused", spec)
    final = list(core.jobs.watch(rec.job_id, min_interval=0))[-1]
    assert final.phase == JobPhase.SUCCEEDED, final.error
    manifest = core.store.get(final.output.id)
    assert FUSED_FILE in [f.path for f in manifest.files] and final.stats["output_rank"] == 0
    with pytest.raises(FailedPrecondition, match="fused weights only"):
        core.export(model_name="ties-cd")
    unet, _ = core.registry.unet("ties-cd")
    per_request, _, _ = core.engine.mix_unet(mix((ex["c"], None), (ex["d"], None), method="ties", fuse=True))
    assert torch.equal(unet_out(unet), unet_out(per_request))


def test_svd_truncation_reports_error_and_full_rank_is_exact(env):
    core, ex = env.core, env.ex
    adapters, exact = core.prepare_merge(mix((ex["a"], None), (ex["b"], None)), for_serving=True)
    full = core.run_merge(adapters, exact).effective_deltas()
    _, rm = core.prepare_merge(mix((ex["a"], None), (ex["b"], None), output_rank=12), for_serving=True)
    res = core.run_merge(adapters, rm)
    assert res.svd_error_max < 1e-5
    _, rm = core.prepare_merge(mix((ex["a"], None), (ex["b"], None), output_rank=2), for_serving=True)
    res = core.run_merge(adapters, rm)
    assert 0 < res.svd_error_mean <= res.svd_error_max < 1
    errs = dict(zip(sorted(full), res.svd_errors, strict=False))
    for name, d in res.effective_deltas().items():
        assert float((d - full[name]).norm() / full[name].norm()) == pytest.approx(errs[name], rel=1e-3)


def test_concurrent_requests_with_different_mixes_equal_their_sequential_results(env):
    core, ex = env.core, env.ex
    requests = [
        GenerationRequest(prompts=["red", "blue"], steps=3, seed=11, scheduler="ddim"),
        GenerationRequest(prompts=["red"], images_per_prompt=2, steps=3, seed=11, merge=mix((ex["a"], 1.0))),
        GenerationRequest(prompts=["red"], steps=3, seed=11, scheduler="euler", merge=mix((ex["a"], 0.5), (ex["c"], 0.5))),
        GenerationRequest(prompts=["blue"], steps=3, seed=11, merge=mix((ex["c"], None), (ex["d"], None), method="dare_ties", density=0.5, seed=3, fuse=True)),
    ]
    sequential = [[img.png for img in core.engine.generate(r)] for r in requests]
    core.engine.cache.clear()  # so the concurrent run merges concurrently too
    results: list[list[bytes] | None] = [None] * len(requests)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [img.png for img in core.engine.generate(requests[i])]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == sequential
    assert len({s[0] for s in sequential}) == len(requests)  # the mixes really differ


def test_concurrent_requests_never_share_a_tokenizers_padding_state(env, monkeypatch):
    """The race behind the flaky concurrent-mix test, forced: a fast tokenizer keeps its padding and
    truncation settings between calls, and a pipeline calls it twice per prompt with different ones
    (padded to max length, then ``padding="longest"``).  Request A sets its settings, then request B
    makes both of its calls before A encodes; with a shared tokenizer A encodes with B's
    ``longest`` padding and its image changes.  Each request must encode with its own settings."""
    engine = env.core.engine
    tok_cls = type(engine.pipe.tokenizer)
    assert hasattr(tok_cls, "set_truncation_and_padding"), "the tiny model's tokenizer should be a fast tokenizer"
    original = tok_cls.set_truncation_and_padding
    from transformers.tokenization_utils_base import PaddingStrategy

    a_padded, b_longest, a_next = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[str]] = {"A": [], "B": []}

    def interleaving(self, *args, **kwargs):
        who = threading.current_thread().name
        if who not in seen:
            return original(self, *args, **kwargs)
        strategy = PaddingStrategy(kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD)).value
        if who == "B" and not seen["B"]:
            assert a_padded.wait(60)  # B starts once A has set max-length padding
        if who == "A" and "max_length" in seen["A"]:
            a_next.set()  # A's next call: it has encoded its prompt
        out = original(self, *args, **kwargs)
        seen[who].append(strategy)
        if who == "A" and seen["A"].count("max_length") == 1 and strategy == "max_length":
            a_padded.set()
            assert b_longest.wait(60)  # A encodes only after B has set "longest" padding ...
        if who == "B" and strategy == "longest" and seen["B"].count("longest") == 1:
            b_longest.set()
            assert a_next.wait(60)  # ... and before B sets anything again
        return out

    req_a = GenerationRequest(prompts=["red circle"], steps=2, seed=5)
    req_b = GenerationRequest(prompts=["a much longer prompt about two blue squares"], steps=2, seed=6)
    alone = [next(engine.generate(r)).png for r in (req_a, req_b)]
    monkeypatch.setattr(tok_cls, "set_truncation_and_padding", interleaving)
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def run(name: str, req: GenerationRequest) -> None:
        try:
            results[name] = next(engine.generate(req)).png
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, r), name=n) for n, r in (("A", req_a), ("B", req_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert a_padded.is_set() and b_longest.is_set() and a_next.is_set(), seen  # the forced interleaving happened
    assert [results["A"], results["B"]] == alone


def test_concurrent_generation_stress_equals_sequential(env):
    """Many rounds of eight concurrent requests (base and two mixes) give the sequential bytes."""
    core, ex = env.core, env.ex
    requests = [
        GenerationRequest(prompts=[p], steps=2, seed=s, merge=m)
        for p, s, m in [
            ("red", 1, None),
            ("two blue squares left of a circle", 2, mix((ex["a"], 0.5), (ex["c"], 0.5))),
            ("green", 3, mix((ex["b"], 1.0))),
            ("a yellow triangle", 4, None),
        ]
        * 2
    ]
    sequential = [next(core.engine.generate(r)).png for r in requests]
    def run(i: int, barrier: threading.Barrier, results: list[bytes | None]) -> None:
        barrier.wait()
        results[i] = next(core.engine.generate(requests[i])).png

    for _ in range(3):
        results: list[bytes | None] = [None] * len(requests)
        barrier = threading.Barrier(len(requests))
        threads = [threading.Thread(target=run, args=(i, barrier, results)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == sequential


def test_cache_hits_for_the_same_mix(env):
    core, ex = env.core, env.ex
    core.engine.cache.clear()
    r = GenerationRequest(prompts=["x"], steps=2, seed=1, merge=mix((ex["a"], 0.3), (ex["b"], 0.7)))
    first = next(core.engine.generate(r))
    second = next(core.engine.generate(r))
    assert (first.served.cache_hit, second.served.cache_hit) == (False, True) and first.png == second.png


def test_full_queue_is_resource_exhausted(env):
    core = env.core
    engine = core.engine
    saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=0)
    try:
        with engine.admission.slot():
            with pytest.raises(ResourceExhausted):
                list(engine.generate(GenerationRequest(prompts=["x"], steps=2)))
        assert len(list(engine.generate(GenerationRequest(prompts=["x"], steps=2)))) == 1
    finally:
        engine.admission = saved


def test_cancel_stops_denoising_and_deadline_is_honoured(env):
    engine = env.core.engine
    calls: list[int] = []

    def is_active() -> bool:
        calls.append(1)
        return len(calls) < 4

    with pytest.raises(Cancelled):
        list(engine.generate(GenerationRequest(prompts=["x"], steps=40), is_active=is_active))
    assert len(calls) == 4  # stopped after a couple of steps, not 40
    with pytest.raises(DeadlineExceeded):
        list(engine.generate(GenerationRequest(prompts=["x"], steps=2), deadline=time.monotonic() - 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"steps": 51}, InvalidArgument, "steps"),
        ({"width": 256}, InvalidArgument, "width"),
        ({"height": 60}, InvalidArgument, "multiple of 8"),
        ({"prompts": []}, InvalidArgument, "at least one prompt"),
        ({"prompts": [" "]}, InvalidArgument, "empty"),
        ({"images_per_prompt": 99}, InvalidArgument, "images_per_prompt"),
        ({"guidance_scale": float("inf")}, InvalidArgument, "guidance"),
        ({"scheduler": "nope"}, InvalidArgument, "scheduler"),
        ({"merge": MergeParams(experts=(ExpertWeight("expert-00000000000000000000"),))}, NotFound, "does not exist"),
        ({"merge": MergeParams(experts=(ExpertWeight("nope/none"),))}, NotFound, "recorded no expert"),
        ({"merge": MergeParams(experts=())}, InvalidArgument, "at least one expert"),
        ({"model_name": "not-registered"}, NotFound, "no model registered"),
    ],
)
def test_bad_generate_requests_are_refused(env, kwargs, error, text):
    req = GenerationRequest(**{"prompts": ["x"], "steps": 2, **kwargs})
    with pytest.raises(error, match=text):
        list(env.core.engine.generate(req))


def test_experts_of_another_base_or_shape_are_refused(env):
    core = env.core
    other = make_expert(core.store, env.sd + "/../tiny-sd", seed=9, skill="other")
    with pytest.raises(FailedPrecondition, match="different base models"):
        core.prepare_merge(mix((env.ex["a"], None), (other, None)), for_serving=True)
    with pytest.raises(FailedPrecondition, match="this service serves"):
        core.engine.mix_unet(mix((other, 1.0)))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(InvalidArgument, match="shape"):
        fused_copy(core.engine.base_unet, deltas={name: torch.zeros(3, 3)})
    with pytest.raises(InvalidArgument, match="does not have"):
        fused_copy(core.engine.base_unet, deltas={"no.such.module": torch.zeros(3, 3)})
    # only safetensors: an expert whose adapter file is missing or corrupt fails clearly
    with core.store.writer(ArtifactKind.EXPERT, parameters={"base_model": {"source": env.sd}}) as w:
        w.put_bytes(DIFFUSERS_FILE, b"not safetensors")
    with pytest.raises(InvalidArgument, match="safetensors"):
        load_expert(core.store, w.manifest)
    assert Path(env.sd).is_dir()
