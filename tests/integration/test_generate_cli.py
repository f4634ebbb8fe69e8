"""``selma generate`` prints what reproduces its images: the base seed, the seed policy and each image's seed.

A real ServingService on the tiny SD model on 127.0.0.1; the CLI runs in this process and finds it
through an endpoints file.
"""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest

from selma.app.cli import main
from selma.client import Endpoints
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma_serving.engine import Admission
from selma_serving.server import hosted
from selma_serving.settings import ServingSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def serving(tiny_models, tmp_path_factory):
    """(endpoints file, the serving core) of one real ServingService."""
    root = tmp_path_factory.mktemp("generate-cli")
    settings = ServingSettings(
        data_dir=root / "data",
        storage_uri=(root / "storage").as_uri(),
        serving_base_model=str(tiny_models.sd),
        serving_max_steps=20,
        serving_max_resolution=128,
        serving_max_queue=0,
        grpc_workers=4,
    )
    service = hosted(settings)
    server = service.start_server(settings, name="serving")  # base loaded, SERVING
    try:
        path = root / "endpoints.json"
        Endpoints(serving=server.address).save(path)
        yield str(path), service.core
    finally:
        server.stop(0)
        service.on_stop()


@pytest.fixture(scope="module")
def endpoints_file(serving):
    return serving[0]


def generate(capsys, endpoints: str, out, *argv: str) -> str:
    capsys.readouterr()
    code = main(["--log-level", "WARNING", "generate", *argv, "--endpoints", endpoints, "-o", str(out), *TINY])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    return stdout


def test_printed_base_seed_and_policy_reproduce_the_images_and_a_printed_image_seed_reproduces_that_image(
    endpoints_file, capsys, tmp_path
):
    prompts = ["two red apples", "a blue cube"]
    first = generate(capsys, endpoints_file, tmp_path / "a.png", *prompts, "-n", "2")
    m = re.search(r"base seed=(\d+)\s+seed policy=(\w+)", first)
    assert m, first
    base_seed, policy = m.group(1), m.group(2)
    assert policy == "derived"
    image_seeds = re.findall(r"^(\S+\.png)\s+seed=(\d+)\s.*--seed (\d+) --seed-policy fixed", first, re.M)
    assert len(image_seeds) == 4, first
    first_images = [(tmp_path / f"a-{i}.png").read_bytes() for i in range(4)]
    assert len(set(first_images)) == 4  # derived: every image has its own noise

    # the printed base seed and policy reproduce every image, byte for byte
    again = generate(capsys, endpoints_file, tmp_path / "b.png", *prompts, "-n", "2", "--seed", base_seed, "--seed-policy", policy)
    assert f"base seed={base_seed}" in again
    assert [(tmp_path / f"b-{i}.png").read_bytes() for i in range(4)] == first_images

    # one image's printed seed with --seed-policy fixed re-renders exactly that image (prompt 1, image 1)
    path, seed, hint_seed = image_seeds[3]
    assert seed == hint_seed and path.endswith("a-3.png")
    one = generate(capsys, endpoints_file, tmp_path / "c.png", prompts[1], "--seed", seed, "--seed-policy", "fixed")
    assert "seed policy=fixed" in one
    assert (tmp_path / "c.png").read_bytes() == first_images[3]

    # sequential is accepted and reproduces too
    generate(capsys, endpoints_file, tmp_path / "d.png", prompts[0], "--seed", "7", "--seed-policy", "sequential")
    generate(capsys, endpoints_file, tmp_path / "e.png", prompts[0], "--seed", "7", "--seed-policy", "sequential")
    assert (tmp_path / "d.png").read_bytes() == (tmp_path / "e.png").read_bytes()


def test_seed_policy_is_validated_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--seed-policy", "random"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--seed", "-1"])
    assert e.value.code == 2


def _wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    """Poll ``predicate`` until true (a bound for a slow shared machine, not a speed check)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize(("priority", "place"), [("high", 1), ("low", 2)])
def test_progress_shows_the_place_in_line_the_priority_earned_then_the_images(serving, capsys, tmp_path, priority, place):
    endpoints, core = serving
    engine = core.engine
    saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=4)
    codes: list[int] = []
    err: list[str] = []  # stderr read so far
    try:
        with engine.admission.slot():  # the server is busy: whatever arrives now waits in line
            channel = grpc.insecure_channel(Endpoints.load(endpoints).serving)
            other = pb_grpc.ServingServiceStub(channel).Generate(pb.GenerateRequest(
                prompts=["a normal request"], seed=3, diffusion=common_pb2.DiffusionSettings(steps=2, width=64, height=64)))
            first_waiter = threading.Thread(target=lambda: list(other), daemon=True)
            first_waiter.start()
            _wait_for(lambda: engine.admission.waiting == 1, "the normal request to queue")
            capsys.readouterr()
            cli = threading.Thread(target=lambda: codes.append(main([
                "--log-level", "WARNING", "generate", "a blue cube", "--endpoints", endpoints, "-o", str(tmp_path / "p.png"),
                *TINY, "--seed", "5", "--priority", priority, "--progress", "--plain"])), daemon=True)
            cli.start()
            _wait_for(lambda: engine.admission.waiting == 2, "the CLI's request to queue")
            # the slot is held until the CLI has shown its place in line
            _wait_for(lambda: err.append(capsys.readouterr().err) or "queued:" in "".join(err), "the CLI's first progress line")
        cli.join(timeout=300)
        first_waiter.join(timeout=300)
        channel.close()
    finally:
        engine.admission = saved
    assert codes == [0]
    out, rest = capsys.readouterr()
    lines = [line for line in ("".join(err) + rest).splitlines() if line.startswith("generate: ")]
    ordinal = {1: "1st", 2: "2nd"}[place]
    # it arrived second: high goes ahead of the normal request, low stays behind it
    assert lines[0] == f"generate: queued: {ordinal} in line (2 waiting)", lines
    assert "generate: generating (batch of 1 image)" in lines
    assert lines[-1] == "generate: generating: image 1/1 received"
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG") and "p.png  seed=" in out


def test_priority_is_validated_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--priority", "urgent"])
    assert e.value.code == 2
