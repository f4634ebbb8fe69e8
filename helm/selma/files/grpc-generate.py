"""Generate one image through ServingService.Generate: the chart's `helm test` runs this after the
health checks, as an application would call selma (TLS and token from the same SELMA_TLS_* and
SELMA_TOKEN environment as grpc-health.py, whose ``channel`` and ``call_metadata`` it uses).

Usage: ``grpc-generate.py [--prompt P] [--steps N] [--timeout S] host:port``. Exit status 0 when
the stream carried at least one PNG; otherwise 1 with the gRPC code and message on one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import grpc

from selma.v1 import serving_service_pb2, serving_service_pb2_grpc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _health_module():
    """grpc-health.py beside this file (its name is not an importable module name)."""
    spec = importlib.util.spec_from_file_location("selma_chart_grpc_health", Path(__file__).with_name("grpc-health.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="one Generate call against a selma ServingService")
    parser.add_argument("target", metavar="host:port")
    parser.add_argument("--prompt", default="a red apple on a wooden table")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the call, seconds")
    parser.add_argument("--server-name", default=None, help="name the server's certificate must carry (TLS)")
    args = parser.parse_args(argv)
    health = _health_module()
    request = serving_service_pb2.GenerateRequest(
        prompts=[args.prompt],
        images_per_prompt=1,
        seed=0,
        diffusion={"steps": args.steps},
    )
    images = 0
    with health.channel(args.target, args.server_name) as ch:
        stub = serving_service_pb2_grpc.ServingServiceStub(ch)
        try:
            for reply in stub.Generate(request, timeout=args.timeout, metadata=health.call_metadata()):
                png = reply.image.png
                if not png.startswith(PNG_MAGIC):
                    print(f"{args.target} Generate: image {reply.index} is not a PNG", flush=True)
                    return 1
                images += 1
                print(f"{args.target} Generate: image {reply.index + 1}/{reply.total}, {len(png)} bytes, seed {reply.image.seed}", flush=True)
        except grpc.RpcError as e:
            print(f"{args.target} Generate: {e.code().name}: {e.details()}", flush=True)
            return 1
    if not images:
        print(f"{args.target} Generate: no image in the stream", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
