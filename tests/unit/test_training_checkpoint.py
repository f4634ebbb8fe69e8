"""Checkpoints: safetensors + JSON round trip, RNG restore, commit point, pruning, corrupt fallback."""

from __future__ import annotations

import random

import numpy as np
import torch

from selma.storage import open_storage
from selma_training.checkpoint import CheckpointStore, TrainState


def make_state(step: int, param: torch.nn.Parameter, opt: torch.optim.Optimizer) -> TrainState:
    return TrainState(step=step, cursor=step * 4, lora={"w": param.detach().clone()}, optimizer=opt.state_dict(),
                      lr_scheduler={"last_epoch": step, "base_lrs": [0.1]}, scaler=None, rng={}, loss_history=[[step, 1.0 / step]], interval_loss=1.0 / step)


def test_round_trip_restores_optimizer_and_every_rng_exactly(make_settings):
    storage = open_storage(make_settings())
    store = CheckpointStore(storage, "training/j/checkpoints/")
    param = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3, 3)
    opt.step()
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    store.save(make_state(1, param, opt), gen)
    expected = (torch.rand(4), torch.randn(4, generator=gen), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    gen2 = torch.Generator().manual_seed(99)
    state, warnings = store.load_latest(gen2)
    assert not warnings and state is not None and state.step == 1 and state.cursor == 4
    got = (torch.rand(4), torch.randn(4, generator=gen2), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert np.array_equal(expected[2], got[2]) and expected[3] == got[3]
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 3))], lr=0.1)
    fresh.load_state_dict(state.optimizer)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_uncommitted_checkpoints_are_ignored_pruning_keeps_the_newest_and_corruption_falls_back(make_settings):
    storage = open_storage(make_settings())
    store = CheckpointStore(storage, "training/j/checkpoints")
    param = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([param])
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        store.save(make_state(step, param, opt), gen)
    storage.put_bytes("training/j/checkpoints/step-00000004/lora.safetensors", b"half-written")  # killed before state.json
    assert store.steps() == [1, 2, 3]
    store.prune(2)
    assert store.steps() == [2, 3]
    storage.put_bytes("training/j/checkpoints/step-00000003/state.safetensors", b"bit rot")
    state, warnings = store.load_latest(gen)
    assert state.step == 2 and warnings == ["checkpoint 3 corrupt; resumed from 2"]
