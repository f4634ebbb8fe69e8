"""``selma generate`` prints what reproduces its images: the base seed, the seed policy and each image's seed.

A real ServingService on the tiny SD model on 127.0.0.1; the CLI runs in this process and finds it
through an endpoints file.
"""

from __future__ import annotations

import re

import pytest

from selma.app.cli import main
from selma.client import Endpoints
from selma_serving.server import hosted
from selma_serving.settings import ServingSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def endpoints_file(tiny_models, tmp_path_factory):
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
        yield str(path)
    finally:
        server.stop(0)
        service.on_stop()


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
