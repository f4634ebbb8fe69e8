"""The LoRA scale convention end to end: experts trained through TrainingService with alpha ≠ rank
load, export, merge and generate at exactly their trained strength (selma.lora_format).

The trainer's in-memory model is recovered by replaying each service job in this process: the
replay runs the job's own document (resuming from its last checkpoint) and publishes it as an
expert of its own, exactly as the service's trainer did; its weights match the service's expert
to float rounding across processes (checked), and every comparison below uses the replayed
expert, whose in-memory model the test holds.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_st

from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.pipelines import make_scheduler
from selma.seeds import SeedPolicy, derive_seed
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import training_service_pb2 as pb
from selma.v1 import training_service_pb2_grpc as pb_grpc
from selma_serving.core import ServingCore
from selma_serving.engine import GenerationRequest
from selma_serving.lora import DIFFUSERS_FILE, KOHYA_FILE, load_expert
from selma_serving.merge import ExpertWeight, MergeParams
from selma_serving.settings import ServingSettings
from selma_training import trainer as trainer_mod
from selma_training.samples import publish_shapes_dataset
from selma_training.server import build_server
from selma_training.settings import TrainingSettings

pytestmark = pytest.mark.slow
TERMINAL = {common_pb2.JOB_PHASE_SUCCEEDED, common_pb2.JOB_PHASE_FAILED, common_pb2.JOB_PHASE_CANCELLED}
PAIRS = {"same": (4, 4.0), "double": (4, 8.0), "quarter": (8, 2.0), "one": (4, 1.0)}  # skill: (rank, alpha)


def unet_inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    return (torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g), torch.tensor([500]),
            torch.randn(1, 77, c.cross_attention_dim, generator=g))


def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs(unet)).sample


def rel_err(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref − base‖: the error relative to the adapter's whole effect."""
    return float((out - ref).norm() / (ref - base).norm())


def fresh_pipe(sd: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """Four experts trained through the service, one per (rank, alpha) pair, and their in-memory replays."""
    root = tmp_path_factory.mktemp("lora-scale")
    settings = TrainingSettings(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), device="cpu",
                                training_default_model=str(tiny_models.sd), batch_progress_interval_seconds=0,
                                batch_poll_seconds=0.2, batch_max_local_jobs=2, training_max_jobs=4, log_level="WARNING")
    store = ArtifactStore(open_storage(settings))
    dataset = publish_shapes_dataset(store, 6)
    server = build_server(settings)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.TrainingServiceStub(channel)
    try:
        job_ids = {}
        for skill, (rank, alpha) in PAIRS.items():
            cfg = pb.ExpertTrainingConfig(resolution=32, max_steps=4, checkpoint_every=2, learning_rate=3e-2,
                                          lora=pb.LoraSettings(rank=rank, alpha=alpha))
            spec = pb.ExpertTrainingSpec(run="scale", skill=skill, dataset=common_pb2.ArtifactRef(id=dataset.id), config=cfg)
            job_ids[skill] = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key=f"scale/{skill}", spec=spec)).job.status.job_id
        experts = {}
        for skill, job_id in job_ids.items():
            req = pb.WatchExpertTrainingRequest(job_id=job_id)
            req.min_interval.FromMilliseconds(200)
            last = None
            for update in stub.WatchExpertTraining(req, timeout=600):
                last = update.job
                if last.status.phase in TERMINAL:
                    break
            assert last is not None and last.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, last
            experts[skill] = store.get(last.status.output.id)
    finally:
        channel.close()
        server.stop(0)
        server.core.shutdown()

    replays = {}
    for skill, manifest in experts.items():
        job = trainer_mod.load_job_document(manifest.parameters["config_artifact_id"], settings)
        replay = job.model_copy(update={"expert_id": new_artifact_id(ArtifactKind.EXPERT, f"replay/{skill}")})
        seen: dict = {}
        original = trainer_mod.lora_state_dicts

        def capture(unet, rank, alpha, _seen=seen, _original=original):
            from peft.utils import get_peft_model_state_dict

            _seen["out"] = unet_out(unet)
            _seen["peft"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
            _seen["scaling"] = {n: m.scaling["default"] for n, m in unet.named_modules() if hasattr(m, "scaling") and "default" in m.scaling}
            return _original(unet, rank, alpha)

        trainer_mod.lora_state_dicts = capture
        try:
            trainer_mod.train(replay, settings)
        finally:
            trainer_mod.lora_state_dicts = original
        replays[skill] = SimpleNamespace(**seen, expert=store.get(replay.expert_id))
    service_experts = experts
    experts = {skill: r.expert for skill, r in replays.items()}
    serving = ServingCore(ServingSettings(data_dir=root / "serving", storage_uri=(root / "storage").as_uri(),
                                          serving_base_model=str(tiny_models.sd), serving_max_steps=50, serving_max_resolution=128))
    serving.start()
    yield SimpleNamespace(store=store, experts=experts, service_experts=service_experts, replays=replays, serving=serving,
                          sd=str(tiny_models.sd), root=root)
    serving.shutdown()


def test_the_replay_is_the_service_trainer_and_the_metadata_states_scale_one(trained):
    for skill, (rank, alpha) in PAIRS.items():
        service_file = load_st(trained.store.read_bytes(trained.service_experts[skill], DIFFUSERS_FILE))
        replay_file = load_st(trained.store.read_bytes(trained.experts[skill], DIFFUSERS_FILE))
        assert service_file.keys() == replay_file.keys()
        for k in service_file:
            assert torch.allclose(service_file[k], replay_file[k], rtol=1e-4, atol=1e-5), (skill, k)
        info = json.loads(trained.store.read_bytes(trained.service_experts[skill], "expert.json"))
        assert (info["lora_format"], info["rank"], info["alpha"], info["trained_alpha"]) == (2, rank, float(rank), alpha)
        assert set(trained.replays[skill].scaling.values()) == {alpha / rank}


@pytest.mark.parametrize("skill", list(PAIRS))
def test_trainer_and_exported_files_load_in_diffusers_at_the_trained_strength(trained, skill, tmp_path):
    ref = trained.replays[skill].out
    base = unet_out(fresh_pipe(trained.sd).unet)
    assert (ref - base).abs().max() > 1e-4  # the expert does something
    files = {
        "trainer diffusers": trained.store.read_bytes(trained.experts[skill], DIFFUSERS_FILE),
        "trainer kohya": trained.store.read_bytes(trained.experts[skill], KOHYA_FILE),
        "exported diffusers": trained.serving.export(expert_id=trained.experts[skill].id, fmt="diffusers").data,
        "exported kohya": trained.serving.export(expert_id=trained.experts[skill].id, fmt="kohya").data,
    }
    for name, data in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        pipe = fresh_pipe(trained.sd)
        pipe.load_lora_weights(str(path), adapter_name="e")
        assert rel_err(unet_out(pipe.unet), ref, base) < 1e-5, (skill, name)


def test_mean_delta_merge_equals_the_weighted_sum_of_the_trainers_deltas(trained):
    skills = list(PAIRS)
    weights = [0.5, 0.3, 0.9, 0.4]
    serving = trained.serving
    params = MergeParams(experts=tuple(ExpertWeight(trained.experts[s].id, w) for s, w in zip(skills, weights, strict=False)))
    adapters, rm = serving.prepare_merge(params, for_serving=False)
    result = serving.run_merge(adapters, rm)
    for module, (A, B) in result.lora.items():
        expected = 0
        for s, w in zip(skills, weights, strict=False):
            peft, scaling = trained.replays[s].peft, trained.replays[s].scaling[module]
            down, up = peft[f"{module}.lora_A.weight"].double(), peft[f"{module}.lora_B.weight"].double()
            expected = expected + w * scaling * (up.flatten(1) @ down.flatten(1))
        got = B.double().flatten(1) @ A.double().flatten(1)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, module


@pytest.mark.parametrize("skill", list(PAIRS))
def test_generate_with_one_expert_equals_diffusers_with_its_exported_file(trained, skill, tmp_path):
    serving = trained.serving
    path = tmp_path / "expert.safetensors"
    path.write_bytes(serving.export(expert_id=trained.experts[skill].id, fmt="diffusers").data)
    req = dict(prompts=["a red circle"], steps=4, seed=11, scheduler="ddim", width=64, height=64, guidance_scale=5.0)
    served = next(serving.engine.generate(GenerationRequest(**req, merge=MergeParams(experts=(ExpertWeight(trained.experts[skill].id, 1.0),)))))
    base = next(serving.engine.generate(GenerationRequest(**req)))
    pipe = fresh_pipe(trained.sd)
    pipe.scheduler = make_scheduler(pipe, "ddim")
    pipe.load_lora_weights(str(path), adapter_name="e")
    seed = derive_seed(SeedPolicy.DERIVED, 11, 0, 0, 1)
    assert served.seed == seed
    image = pipe(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                 generator=torch.Generator().manual_seed(seed)).images[0]

    def px(png_or_image) -> np.ndarray:
        img = Image.open(io.BytesIO(png_or_image)) if isinstance(png_or_image, bytes) else png_or_image
        return np.asarray(img.convert("RGB")).astype(int)

    effect = np.abs(px(served.png) - px(base.png)).max()
    assert effect > 5, effect  # the expert changes the image, so a wrong scale would show
    assert np.abs(px(served.png) - px(image)).max() <= 1  # fused (service) vs unfused (diffusers) rounding


def test_an_expert_stored_in_the_old_format_loads_at_its_trained_strength(trained):
    """Format 1 (no lora_format): the trainer folded α/r into B but expert.json still said alpha = α."""
    new = trained.experts["double"]
    info = json.loads(trained.store.read_bytes(new, "expert.json"))
    old_info = {k: v for k, v in info.items() if k not in ("lora_format", "trained_alpha")} | {"alpha": info["trained_alpha"]}
    with trained.store.writer(ArtifactKind.EXPERT, key="old-format/double", parameters=old_info) as w:
        w.put_bytes(DIFFUSERS_FILE, trained.store.read_bytes(new, DIFFUSERS_FILE))
        w.put_bytes("expert.json", json.dumps(old_info).encode())
    old = load_expert(trained.store, w.manifest)
    current = load_expert(trained.store, new)
    assert old_info["alpha"] == 8.0 and "lora_format" not in old_info
    for module, m in current.modules.items():
        assert torch.equal(old.modules[module].delta(), m.delta()), module
    peft, scaling = trained.replays["double"].peft, trained.replays["double"].scaling
    for module, m in current.modules.items():
        trained_delta = scaling[module] * (peft[f"{module}.lora_B.weight"].flatten(1) @ peft[f"{module}.lora_A.weight"].flatten(1))
        assert torch.allclose(m.delta().flatten(1), trained_delta, rtol=1e-5, atol=1e-7), module
