"""Requests with different expert mixes in one batched call (shared base forward, per-row LoRA deltas unfused).

The per-row module equals the fused weight row by row, through classifier-free guidance's doubled
batch; in the engine, several cold mixes run as one call whose images equal each request's solo
(fused) image within MIXED_TOLERANCE; warm mixes, too few cold mixes, and other merge methods run
fused; a mix that fails fails only its own request."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_serving_batching import CallLog, mix, pixels, run_together, solo

from selma.errors import FailedPrecondition, NotFound
from selma_serving.core import ServingCore
from selma_serving.engine import MIXES_KIND, BatchPolicy, GenerationRequest
from selma_serving.lora import Adapter, BaseModelId, LoraModule
from selma_serving.merge import ExpertWeight, MergeParams, ResolvedMerge
from selma_serving.mixed import RowLora, RowMix, mixable, mixed_unet, row_factors
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert

# Max |mixed - solo fused| per channel of the 8-bit images.  Fused adds Σ c·B·A into W (fp32) and
# runs one matmul; unfused runs W·x and B·(A·x) separately: the same sum, rounded differently.
# Measured on this CPU (one torch thread, tiny SD 64x64, 4 steps) with
# benchmarks/serving_mixed_batch.py --tolerance-rounds 6: 48 images in calls of 8 distinct mixes, max 1.
MIXED_TOLERANCE = 2


def _adapter(name: str, modules: dict[str, LoraModule]) -> Adapter:
    return Adapter(id=name, base_model=BaseModelId("tiny"), modules=modules)


def _rm(ids, weights, blocks=None) -> ResolvedMerge:
    return ResolvedMerge(expert_ids=tuple(ids), weights=tuple(weights), block_weights=tuple(blocks or [(None, None, None)] * len(ids)),
                         method="mean_delta", density=0.0, sign_election="total", output_rank=0, fuse=True, seed=0, variant="")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_row_lora_equals_each_rows_fused_weight_through_the_doubled_guidance_batch(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        base = torch.nn.Linear(12, 10)
        shapes = [((r, 12), (10, r)) for r in (3, 5)]
    else:
        base = torch.nn.Conv2d(6, 8, 3, padding=1)
        shapes = [((r, 6, 3, 3), (8, r, 1, 1)) for r in (3, 5)]
    name = "down_blocks.0.layer"
    experts = [_adapter(f"e{i}", {name: LoraModule(torch.randn(a, generator=gen), torch.randn(b, generator=gen), alpha=2.0 * (i + 1))})
               for i, (a, b) in enumerate(shapes)]
    mixes = [
        RowMix(_rm(["e0"], [1.0]), (experts[0],)),
        RowMix(_rm(["e0", "e1"], [0.3, 0.7]), tuple(experts)),
        RowMix(_rm(["e1"], [0.5], [(2.0, None, None)]), (experts[1],)),  # a "down" block override: 2.0 here
    ]
    rows = [2, 0, 1, 1]  # image j runs mix rows[j]
    module = RowLora(base, *row_factors(mixes, rows, name))
    x_img = torch.randn((4, 7, 12) if kind == "linear" else (4, 6, 5, 5), generator=gen)
    x = torch.cat([x_img, x_img + 1])  # guidance: [uncond rows; cond rows], row j and 4 + j are image j
    with torch.no_grad():
        y = module(x)
        for j in range(8):
            m = mixes[rows[j % 4]]
            delta = sum(m.rm.weight(k, name) * a.modules[name].delta() for k, a in enumerate(m.adapters))
            fused = type(base)(*([12, 10] if kind == "linear" else [6, 8, 3]), **({} if kind == "linear" else {"padding": 1}))
            fused.load_state_dict({"weight": base.weight + delta, "bias": base.bias})
            assert torch.allclose(y[j], fused(x[j:j + 1])[0], atol=1e-5), j
        with pytest.raises(RuntimeError, match="does not map onto 4 images"):
            module(x[:6])


def test_mixable_means_the_exact_weighted_sum_of_the_loras():
    e = (ExpertWeight("a", 0.5), ExpertWeight("b", 0.5))
    assert mixable(MergeParams(experts=e))
    assert not mixable(MergeParams(experts=e, method="ties"))
    assert not mixable(MergeParams(experts=e, output_rank=4))  # an SVD-truncated mix is another model


def test_the_mixed_unet_leaves_the_base_untouched_and_shares_its_weights(env):
    engine, ex = env.engine, env.ex
    base = engine.base_unet
    before = {n: p.clone() for n, p in base.named_parameters()}
    rowmix = engine.resolve_mix(mix((ex["a"], 1.0)))
    unet = mixed_unet(base, [rowmix], [0])
    wrapped = [n for n, m in unet.named_modules() if isinstance(m, RowLora)]
    assert sorted(wrapped) == sorted(rowmix.adapters[0].modules)
    assert not any(isinstance(m, RowLora) for m in base.modules())
    assert all(p is base.get_parameter(n) for n, p in unet.named_parameters() if ".base." not in n)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-mixed")
    sd = str(tiny_models.sd)
    settings = ServingSettings(
        data_dir=root / "data",
        storage_uri=(root / "storage").as_uri(),
        serving_base_model=sd,
        serving_max_steps=50,
        serving_max_resolution=128,
        serving_max_batch_size=8,
        serving_batch_wait_ms=0,
        serving_mixed_batch_min_mixes=2,
    )
    core = ServingCore(settings)
    core.start()
    ex = {k: make_expert(core.store, sd, seed=s, rank=4, skill=k, scale=0.5) for k, s in (("a", 1), ("b", 2), ("c", 3))}
    yield SimpleNamespace(core=core, engine=core.engine, ex=ex)
    core.shutdown()


def _mixes(ex):
    return [
        mix((ex["a"], 1.0)),
        mix((ex["b"], 1.0)),
        mix((ex["a"], 0.5), (ex["c"], 0.5)),
        MergeParams(experts=(ExpertWeight(ex["b"].id, 0.7, up=1.5), ExpertWeight(ex["c"].id, 0.3))),  # a block override
    ]


def _diff(a, b) -> int:
    return int(np.abs(pixels(a.png) - pixels(b.png)).max())


def test_different_mixes_run_as_one_unfused_call_and_equal_their_solo_fused_images(env, monkeypatch):
    engine = env.engine
    requests = [GenerationRequest(prompts=[p], steps=4, seed=s, merge=m)
                for p, s, m in zip(["red circle", "a blue cube", "green", "two stars"], [1, 2, 3, 4], _mixes(env.ex), strict=True)]
    requests[2].images_per_prompt = 2
    alone = [solo(engine, r) for r in requests]
    # the mixes look different from each other, so a row given another row's mix would show
    assert _diff(alone[0][0], alone[1][0]) > 10 * MIXED_TOLERANCE
    engine.cache.clear()  # cold: no fused merge cached for any of them
    log = CallLog(engine, monkeypatch)
    batched = run_together(engine, requests)
    assert log.sizes == [5]  # one call, four mixes, five images
    assert len(engine.cache) == 0  # nothing was merged or fused
    for b, a in zip(batched, alone, strict=True):
        assert not isinstance(b, BaseException), b
        assert [i.seed for i in b] == [i.seed for i in a]
        assert all(_diff(x, y) <= MIXED_TOLERANCE for x, y in zip(b, a, strict=True))
        assert all(i.served.kind == MIXES_KIND and not i.served.fused and i.served.merge == a[0].served.merge for i in b)


def test_warm_mixes_and_too_few_cold_mixes_run_fused_one_call_per_mix(env, monkeypatch):
    engine = env.engine
    mixes = _mixes(env.ex)
    requests = [GenerationRequest(prompts=["red"], steps=3, seed=i, merge=m) for i, m in enumerate(mixes[:3])]
    alone = [solo(engine, r) for r in requests]  # builds and caches every fused mix: all warm
    log = CallLog(engine, monkeypatch)
    warm = run_together(engine, requests)
    assert log.sizes == [1, 1, 1]
    assert [[i.png for i in r] for r in warm] == [[i.png for i in r] for r in alone]  # fused, batch of one: byte-identical
    assert all(i.served.fused and i.served.cache_hit for r in warm for i in r)

    engine.cache.clear()
    engine.mix_unet(mixes[0])  # one warm, two cold
    monkeypatch.setattr(engine, "batching", BatchPolicy(8, 0.0, mixed_min_mixes=3))
    log.sizes.clear()
    fused = run_together(engine, requests)
    assert log.sizes == [1, 1, 1]  # two cold mixes < 3: each fused in its own call
    assert [[i.png for i in r] for r in fused] == [[i.png for i in r] for r in alone]


def test_other_merge_methods_never_join_a_mixed_call(env, monkeypatch):
    engine, ex = env.engine, env.ex
    ties = MergeParams(experts=(ExpertWeight(ex["a"].id, 0.5), ExpertWeight(ex["c"].id, 0.5)), method="ties", fuse=True)
    requests = [GenerationRequest(prompts=["red"], steps=3, seed=1, merge=m) for m in (_mixes(ex)[0], ties, _mixes(ex)[1])]
    engine.cache.clear()
    log = CallLog(engine, monkeypatch)
    results = run_together(engine, requests)
    assert sorted(log.sizes) == [1, 2]  # the two mean_delta mixes together, the TIES merge alone
    assert results[1][0].served.fused and results[1][0].served.kind == "mix"
    assert results[0][0].served.kind == results[2][0].served.kind == MIXES_KIND


def test_a_mix_that_fails_fails_only_its_own_request(env, monkeypatch):
    engine = env.engine
    mixes = _mixes(env.ex)
    bad = MergeParams(experts=(ExpertWeight("no-such-expert", 1.0),))
    requests = [GenerationRequest(prompts=["red"], steps=3, seed=i, merge=m) for i, m in enumerate([mixes[0], bad, mixes[1]])]
    engine.cache.clear()
    log = CallLog(engine, monkeypatch)
    results = run_together(engine, requests)
    assert isinstance(results[1], NotFound) and "no-such-expert" in str(results[1])
    assert log.sizes == [2] and all(len(results[i]) == 1 for i in (0, 2))


def test_a_fused_mix_that_fails_its_probe_fails_only_its_own_request(env, monkeypatch):
    engine = env.engine
    mixes = _mixes(env.ex)
    requests = [GenerationRequest(prompts=["red"], steps=3, seed=i, merge=m) for i, m in enumerate(mixes[:2])]
    monkeypatch.setattr(engine, "batching", BatchPolicy(8, 0.0, mixed_min_mixes=5))  # two mixes < 5: each runs fused
    real, bad = engine.fused_mix, engine.resolve_mix(mixes[0]).rm

    def fused_mix(mix):
        if mix.rm == bad:
            raise FailedPrecondition("the mix of a: merged weight deltas out of range")
        return real(mix)

    monkeypatch.setattr(engine, "fused_mix", fused_mix)
    engine.cache.clear()
    log = CallLog(engine, monkeypatch)
    results = run_together(engine, requests)
    assert isinstance(results[0], FailedPrecondition) and "out of range" in str(results[0])
    assert log.sizes == [1] and len(results[1]) == 1 and results[1][0].served.fused


def test_an_unfused_mix_gets_the_probe_a_fused_build_runs_and_fails_alone(env, monkeypatch):
    """A mix whose merged deltas a fused build would refuse (over serving_max_adapter_value) is refused
    unfused too, with the same FAILED_PRECONDITION, and the verdict is kept: each mix is merged once."""
    import selma_serving.engine as engine_module
    from selma_serving.merge import merge

    engine, ex = env.engine, env.ex
    heavy = mix((ex["a"], 60.0), (ex["b"], 60.0))  # large weights: merged deltas far beyond the two fine mixes'
    fine = _mixes(ex)[:2]
    largest = max(float(t.abs().max()) for m in fine
                  for t in merge(list(engine.resolve_mix(m).adapters), engine.resolve_mix(m).rm).effective_deltas().values())
    monkeypatch.setattr(engine.settings, "serving_max_adapter_value", largest * 2)
    with pytest.raises(FailedPrecondition, match="merged weight deltas"):
        engine.mix_unet(heavy)  # what the fused path answers
    engine.cache.clear()
    engine._mix_checks.clear()
    merged = []
    monkeypatch.setattr(engine_module, "merge", lambda adapters, rm, **kw: (merged.append(rm), merge(adapters, rm, **kw))[1])
    requests = [GenerationRequest(prompts=["red"], steps=3, seed=i, merge=m) for i, m in enumerate([fine[0], heavy, fine[1]])]
    log = CallLog(engine, monkeypatch)
    for _ in range(2):
        results = run_together(engine, requests)
        assert isinstance(results[1], FailedPrecondition) and "merged weight deltas" in str(results[1])
        assert all(len(results[i]) == 1 and results[i][0].served.kind == MIXES_KIND for i in (0, 2))
    assert log.sizes == [2, 2]  # the other two mixes still share one unfused call
    assert len(merged) == 3 and len(set(merged)) == 3  # one probe merge per mix, not one per call
