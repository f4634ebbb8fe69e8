"""Merge math on small matrices, checked against direct numpy implementations on the deltas ΔWᵢ."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from selma.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted
from selma.seeds import SeedPolicy, derive_seed
from selma_serving.engine import SEED_POLICIES, Admission, FusedCache
from selma_serving.lora import Adapter, BaseModelId, LoraModule, adapter_file, parse_state_dict, read_safetensors
from selma_serving.merge import (
    ExpertWeight,
    MergeParams,
    combine,
    dare_mask,
    derived_seed,
    merge,
    params_from_dict,
    resolve,
    svd_truncate,
    svd_truncate_factored,
)

BASE = BaseModelId("/models/tiny")
MODULES = {"down_blocks.0.attn.to_q": (6, 5), "mid_block.attn.to_k": (4, 7), "up_blocks.1.attn.to_v": (5, 5), "conv_in": (3, 4)}


def adapter(name: str, seed: int, rank: int, alpha: float | None = None, base: BaseModelId = BASE, modules: dict | None = None) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {
        m: LoraModule(A=torch.randn(rank, i, generator=g), B=torch.randn(o, rank, generator=g), alpha=float(alpha or rank))
        for m, (o, i) in (modules or MODULES).items()
    }
    return Adapter(id=name, base_model=base, modules=mods)


def np_delta(m: LoraModule) -> np.ndarray:
    return (m.alpha / m.rank) * (m.B.double().numpy() @ m.A.double().numpy())


def np_trim(t: np.ndarray, density: float) -> np.ndarray:
    k = max(1, math.ceil(density * t.size - 1e-9))
    flat = t.ravel()
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(t.shape)


def np_ties(trimmed: list[np.ndarray], w: list[float], sign: str) -> np.ndarray:
    v = np.stack([wi * t for wi, t in zip(w, trimmed, strict=False)])
    total = v.sum(0)
    if sign == "frequency":
        elected = np.sign(np.sign(v).sum(0))
        elected = np.where(elected == 0, np.sign(total), elected)
    else:
        elected = np.sign(total)
    out = np.zeros_like(total)
    for idx in np.ndindex(total.shape):
        agree = [i for i in range(len(w)) if elected[idx] != 0 and np.sign(v[i][idx]) == elected[idx]]
        wsum = sum(w[i] for i in agree)
        if wsum > 0:
            out[idx] = sum(v[i][idx] for i in agree) / wsum * sum(w)
    return out


def rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = a.double().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


EXPERTS = [adapter("expert-a", 1, 3, alpha=6), adapter("expert-b", 2, 3, alpha=1.5), adapter("expert-c", 3, 3)]


def params(method: str, weights=(None, None, None), **kw) -> MergeParams:
    return MergeParams(experts=tuple(ExpertWeight(a.id, w) for a, w in zip(EXPERTS, weights, strict=False)), method=method, **kw)


def test_mean_delta_is_exact_concatenated_lora_of_summed_deltas():
    rm = resolve(params("mean_delta"), EXPERTS)
    assert rm.weights == pytest.approx((1 / 3,) * 3)
    result = merge(EXPERTS, rm)
    assert result.rank == 9 and result.svd_errors == []
    for name, (A, B) in result.lora.items():
        assert A.shape[0] == B.shape[1] == 9
        expected = sum(np_delta(a.modules[name]) / 3 for a in EXPERTS)
        assert rel(B @ A, expected) < 1e-6


@pytest.mark.parametrize("method", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_selma_variant_methods_act_on_full_deltas_like_numpy(method, sign):
    weights = (0.5, 0.3, 0.9)
    rm = resolve(params(method, weights, density=0.4, sign_election=sign, fuse=True, seed=7, variant="selma"), EXPERTS)
    result = merge(EXPERTS, rm)
    for name in MODULES:
        deltas = [np_delta(a.modules[name]) for a in EXPERTS]
        if method.startswith("dare"):
            masks = [dare_mask(d.shape, 0.4, derived_seed(7, name, a.id)).numpy() for d, a in zip(deltas, EXPERTS, strict=False)]
            dropped = [d * m / 0.4 for d, m in zip(deltas, masks, strict=False)]
        if method == "magnitude_prune":
            expected = sum(w * np_trim(d, 0.4) for w, d in zip(weights, deltas, strict=False))
        elif method == "ties":
            expected = np_ties([np_trim(d, 0.4) for d in deltas], list(weights), sign)
        elif method == "dare_linear":
            expected = sum(w * d for w, d in zip(weights, dropped, strict=False))
        else:
            expected = np_ties(dropped, list(weights), sign)
        assert rel(result.deltas[name], expected) < 1e-5, (method, name)


def test_selma_ties_at_full_density_with_agreeing_signs_is_mean_delta():
    d = [torch.rand(4, 4) + 0.1 for _ in range(3)]
    ties = combine(d, [0.2, 0.3, 0.5], "ties", density=1.0, variant="selma")
    assert torch.allclose(ties, combine(d, [0.2, 0.3, 0.5], "mean_delta"), atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.4, 0.05, 1.0])
def test_peft_variant_equals_peft_merge_utils_on_the_same_full_deltas(method, sign, density):
    """The default variant is PEFT's merge_utils, entry for entry; DARE's random masks are fixed to ours."""
    from unittest import mock

    from peft.utils import merge_utils

    weights = (0.5, 0.3, 0.9)
    rm = resolve(params(method, weights, density=density, sign_election=sign, fuse=True, seed=7), EXPERTS)
    assert rm.variant == "peft"
    result = merge(EXPERTS, rm)
    for name in MODULES:
        deltas = [a.modules[name].delta() for a in EXPERTS]
        w = torch.tensor(weights)
        if method == "magnitude_prune":
            expected = merge_utils.magnitude_prune(deltas, w, density)
        elif method == "ties":
            expected = merge_utils.ties(deltas, w, density, majority_sign_method=sign)
        else:
            masks = iter([dare_mask(d.shape, density, derived_seed(7, name, a.id)).float() for d, a in zip(deltas, EXPERTS, strict=False)])
            with mock.patch.object(merge_utils.torch, "bernoulli", side_effect=lambda _p, _masks=masks: next(_masks)):
                if method == "dare_linear":
                    expected = merge_utils.dare_linear(deltas, w, density)
                else:
                    expected = merge_utils.dare_ties(deltas, w, density, majority_sign_method=sign)
        assert torch.allclose(result.deltas[name], expected, rtol=1e-5, atol=1e-6), (method, name)


def test_the_two_ties_variants_differ_where_peft_and_selma_differ():
    """PEFT keeps ⌊d·n⌋ entries and divides by the agreeing count; selma keeps ⌈d·n⌉ and divides by the agreeing weight."""
    from selma_serving.merge import keep_count

    assert (keep_count(7, 0.5, "peft"), keep_count(7, 0.5, "selma")) == (3, 4)
    assert (keep_count(7, 0.1, "peft"), keep_count(7, 0.1, "selma")) == (0, 1)
    d = [torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)]
    assert torch.allclose(combine(d, [0.5, 0.5], "ties", density=1.0), torch.full((2, 2), 1.0))  # (0.5 + 1.5) / 2 agree
    assert torch.allclose(combine(d, [0.5, 0.5], "ties", density=1.0, variant="selma"), torch.full((2, 2), 2.0))


def test_dare_masks_are_seeded_and_keep_about_density():
    a = dare_mask((200, 200), 0.3, derived_seed(1, "m", "e"))
    assert torch.equal(a, dare_mask((200, 200), 0.3, derived_seed(1, "m", "e")))
    assert not torch.equal(a, dare_mask((200, 200), 0.3, derived_seed(2, "m", "e")))
    assert abs(a.float().mean().item() - 0.3) < 0.02


def test_svd_full_rank_is_exact_and_truncation_reports_its_error():
    delta = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    A, B, err = svd_truncate(delta, 10)
    assert err < 1e-6 and rel(B @ A, delta.double().numpy()) < 1e-5
    A, B, err = svd_truncate(delta, 3)
    assert A.shape == (3, 10) and B.shape == (12, 3)
    assert err == pytest.approx(rel(B @ A, delta.double().numpy()), rel=1e-4) and err > 0.1
    A2, B2, err2 = svd_truncate(delta, 16)  # more than the matrix has: zero-padded, exact
    assert A2.shape == (16, 10) and err2 < 1e-6


def test_factored_svd_equals_full_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 20, generator=g), torch.randn(15, 6, generator=g)
    a1, b1, e1 = svd_truncate_factored(A, B, 3, (15, 20))
    a2, b2, e2 = svd_truncate(B @ A, 3)
    assert e1 == pytest.approx(e2, rel=1e-4)
    assert rel(b1 @ a1, (b2 @ a2).double().numpy()) < 1e-4


def test_mean_delta_truncated_rank_reports_error():
    rm = resolve(params("mean_delta", output_rank=2), EXPERTS)
    result = merge(EXPERTS, rm)
    assert result.rank == 2 and len(result.svd_errors) == len(MODULES) and result.svd_error_max > 0
    for name, (A, B) in result.lora.items():
        expected = sum(np_delta(a.modules[name]) / 3 for a in EXPERTS)
        assert rel(B @ A, expected) == pytest.approx(dict(zip(sorted(MODULES), result.svd_errors, strict=False))[name], rel=1e-3)


def test_block_weights_override_the_expert_weight_per_block():
    p = MergeParams(experts=(ExpertWeight("expert-a", 1.0, down=0.0, up=2.0), ExpertWeight("expert-b", 1.0)), fuse=True)
    result = merge(EXPERTS[:2], resolve(p, EXPERTS[:2]))
    for name in MODULES:
        wa = {"down": 0.0, "up": 2.0}.get(name.split("_")[0], 1.0)
        expected = wa * np_delta(EXPERTS[0].modules[name]) + np_delta(EXPERTS[1].modules[name])
        assert rel(result.deltas[name], expected) < 1e-6


def test_single_expert_at_weight_one_merges_to_itself():
    rm = resolve(MergeParams(experts=(ExpertWeight("expert-b", 1.0),)), EXPERTS[1:2])
    for name, (A, B) in merge(EXPERTS[1:2], rm).lora.items():
        assert rel(B @ A, np_delta(EXPERTS[1].modules[name])) < 1e-6


@pytest.mark.parametrize(
    ("experts", "kw", "error", "text"),
    [
        ([], {}, InvalidArgument, "at least one expert"),
        (EXPERTS[:2], {"weights": (1.0, None)}, InvalidArgument, "every expert sets a weight"),
        (EXPERTS[:2], {"weights": (1.0, float("nan"))}, InvalidArgument, "finite"),
        (EXPERTS[:2], {"method": "ties", "weights": (1.0, -1.0)}, InvalidArgument, ">= 0"),
        (EXPERTS[:2], {"density": 1.5, "method": "ties"}, InvalidArgument, "density"),
        (EXPERTS[:2], {"method": "bogus"}, InvalidArgument, "unknown merge method"),
        ([EXPERTS[0], adapter("expert-r", 5, 5)], {"method": "ties"}, FailedPrecondition, "ranks differ"),
        ([EXPERTS[0], adapter("expert-o", 5, 3, base=BaseModelId("/models/other"))], {}, FailedPrecondition, "different base models"),
        ([EXPERTS[0], adapter("expert-m", 5, 3, modules={"conv_in": (3, 4)})], {}, InvalidArgument, "different modules"),
        ([EXPERTS[0], adapter("expert-s", 5, 3, modules={**MODULES, "conv_in": (3, 5)})], {}, InvalidArgument, "shape"),
        ([EXPERTS[0], EXPERTS[0]], {}, InvalidArgument, "listed twice"),
    ],
)
def test_invalid_merges_are_refused_with_a_clear_reason(experts, kw, error, text):
    weights = kw.pop("weights", (None,) * len(experts))
    p = MergeParams(experts=tuple(ExpertWeight(a.id, w) for a, w in zip(experts, weights, strict=False)), **kw)
    with pytest.raises(error, match=text):
        resolve(p, experts)


def test_ranks_may_differ_when_an_output_rank_is_given():
    experts = [EXPERTS[0], adapter("expert-r", 5, 5)]
    p = MergeParams(experts=tuple(ExpertWeight(a.id) for a in experts), method="ties", output_rank=4)
    assert merge(experts, resolve(p, experts)).rank == 4


def test_params_from_proto_json():
    p = params_from_dict(
        {
            "experts": [{"expert_id": "e1", "weight": 0.25, "block_weights": {"mid": 0.0}}, {"expert_id": "r/s", "weight": 0.75}],
            "method": "MERGE_METHOD_DARE_TIES",
            "density": 0.3,
            "sign_election": "SIGN_ELECTION_FREQUENCY",
            "seed": "42",
        }
    )
    assert p.method == "dare_ties" and p.sign_election == "frequency" and p.seed == 42 and p.experts[0].mid == 0.0
    assert p.variant == "peft"
    assert params_from_dict({"experts": [{"expert_id": "e"}], "variant": "MERGE_VARIANT_SELMA"}).variant == "selma"
    assert params_from_dict({"experts": [{"expert_id": "e"}]}).method == "mean_delta"
    with pytest.raises(InvalidArgument, match="expert_id is empty"):
        params_from_dict({"experts": [{"weight": 1.0}]})
    for bad in ({"method": "MERGE_METHOD_BOGUS"}, {"method": 99}, {"sign_election": "majority"}, {"variant": 7}):
        with pytest.raises(InvalidArgument) as e:
            params_from_dict({"experts": [{"expert_id": "e"}], **bad})
        assert e.value.field == next(iter(bad))


def test_adapter_files_round_trip_at_scale_one():
    a = EXPERTS[0]  # alpha 6, rank 3: the file folds alpha/r into B
    back = parse_state_dict(read_safetensors(adapter_file(a, "diffusers"), what="x"), what="x")
    for name, m in a.modules.items():
        assert rel(back[name].delta(), np_delta(m)) < 1e-6


@pytest.mark.parametrize(
    ("sd", "text"),
    [
        ({"lora_unet_down.lora_down.weight": torch.zeros(1, 1)}, "kohya"),
        ({"text_encoder.x.lora.down.weight": torch.zeros(1, 1)}, "text encoder"),
        ({"unet.m.lora.down.weight": torch.zeros(2, 3)}, "only its down"),
        ({"unet.m.lora.down.weight": torch.zeros(2, 3), "unet.m.lora.up.weight": torch.zeros(4, 5)}, "incompatible shapes"),
        ({"unet.m.weird": torch.zeros(1)}, "unexpected tensor"),
    ],
)
def test_bad_adapter_files_are_refused(sd, text):
    with pytest.raises(InvalidArgument, match=text):
        parse_state_dict(sd, what="expert x")
    with pytest.raises(InvalidArgument, match="not a readable safetensors"):
        read_safetensors(b"\x80\x04pickle", what="expert x")


@pytest.mark.parametrize(
    ("value", "text"),
    [(float("inf"), "non-finite"), (float("nan"), "non-finite"), (1e30, "SELMA_SERVING_MAX_ADAPTER_VALUE=10000")],
)
def test_adapter_tensors_must_be_finite_and_bounded_naming_the_tensor(value, text):
    up = torch.zeros(4, 2)
    up[1, 1] = value
    sd = {"unet.m.lora.down.weight": torch.zeros(2, 3), "unet.m.lora.up.weight": up}
    with pytest.raises(FailedPrecondition, match=text) as e:
        parse_state_dict(sd, what="expert x", max_abs=1e4)
    assert "expert x" in str(e.value) and "unet.m.lora.up.weight" in str(e.value)
    up[1, 1] = 1e4  # at the bound
    assert parse_state_dict(sd, what="expert x", max_abs=1e4)["m"].B[1, 1] == 1e4


def test_seed_policies():
    # serving passes GenerationRequest.seed_policy (a short name) to the library's derive_seed
    assert set(SEED_POLICIES) == {"derived", "sequential", "fixed"}
    assert derive_seed("fixed", 5, 3, 2, 4) == 5
    assert derive_seed("sequential", 5, 3, 2, 4) == 5 + 3 * 4 + 2
    d = derive_seed("derived", 5, 3, 2, 4)
    assert d == derive_seed(SeedPolicy.DERIVED, 5, 3, 2, 4) != derive_seed("derived", 5, 3, 1, 4) and 0 <= d < 2**63


def test_fused_cache_is_lru_by_bytes_and_builds_once():
    cache = FusedCache(max_bytes=100)
    builds = []

    def build(key, size):
        def f():
            builds.append(key)
            return torch.nn.Linear(1, 1), size

        return f

    assert cache.get("a", build("a", 60)) [1] is False
    assert cache.get("a", build("a", 60))[1] is True
    cache.get("b", build("b", 60))  # evicts a
    assert cache.bytes == 60 and len(cache) == 1
    cache.get("a", build("a", 60))
    assert builds == ["a", "b", "a"]
    cache.get("big", build("big", 500))  # too big to cache, still served
    assert "big" not in cache._items


def test_admission_refuses_when_the_queue_is_full_and_honours_cancel_and_deadline():
    adm = Admission(max_concurrent=1, max_queue=1)
    with adm.slot():
        entered, cancel, errors = threading.Event(), threading.Event(), []

        def waiter():
            try:
                entered.set()
                with adm.slot(cancel=cancel):
                    pass
            except Cancelled as e:
                errors.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        entered.wait()
        # The waiter may not have queued yet; wait on the condition until it has (no sleeps).
        with adm._cond:
            adm._cond.wait_for(lambda: adm.waiting == 1, timeout=10)
        with pytest.raises(ResourceExhausted, match="busy"):
            with adm.slot():
                pass
        cancel.set()
        adm.wake()
        t.join(10)
        assert len(errors) == 1
        adm.max_queue = 2
        with pytest.raises(DeadlineExceeded):
            with adm.slot(deadline=0.0):
                pass
    assert adm.running == 0 and adm.waiting == 0


def test_stored_merges_from_before_variants_read_back_as_the_selma_variant():
    from selma_serving.core import spec_json_from_dict

    assert spec_json_from_dict({"experts": [], "method": "ties"})["variant"] == "MERGE_VARIANT_SELMA"
    assert spec_json_from_dict({"experts": [], "method": "ties", "variant": "peft"})["variant"] == "MERGE_VARIANT_PEFT"
    assert "variant" not in spec_json_from_dict({"experts": [], "method": "mean_delta"})
