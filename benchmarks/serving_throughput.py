"""Serving throughput and latency under concurrent clients, side by side in one process (never a pass/fail test).

Two real ServingService gRPC servers on 127.0.0.1 over the same tiny SD model: dynamic batching on
(SELMA_SERVING_MAX_BATCH_SIZE=--max-batch, the device's default wait) and off (batch size 1: the
serial service).  Per concurrency N (1/2/4/8/16 clients, one single-image Generate each, distinct
prompts and seeds), the shared harness times one round of N concurrent requests against

  * the anchor: ONE in-process diffusers call with batch size N (a list of N prompts and generators);
  * the serial service (batching off).

Printed: service images/s divided by the anchor's, and by the serial service's (paired per block).
Then p50/p99 request latency at --latency-clients clients, each sending --latency-requests in a
closed loop, batched and serial.

    .venv/bin/python benchmarks/serving_throughput.py [--steps 4] [--size 64] [--repeats 3] [--clients 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from harness import Comparison, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="diffusers pipeline directory (default: build the tiny SD model)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="width and height")
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-clients", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=4, help="requests per client in the latency run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = the CI setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()

    import grpc

    from selma.models.tiny import build_tiny
    from selma.v1 import common_pb2
    from selma.v1 import serving_service_pb2 as pb
    from selma.v1 import serving_service_pb2_grpc as pb_grpc
    from selma_serving.server import build_server
    from selma_serving.settings import ServingSettings

    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = args.base or str(build_tiny(tmp_path / "tiny").sd)
        servers, stubs, channels = {}, {}, []
        for name, batch in (("batched", args.max_batch), ("serial", 1)):
            settings = ServingSettings(
                data_dir=tmp_path / name / "data", storage_uri=(tmp_path / name / "storage").as_uri(), serving_base_model=base,
                serving_max_batch_size=batch, serving_max_queue=4 * max(counts + [args.latency_clients]),
                serving_max_steps=max(50, args.steps), serving_max_resolution=max(args.size, 64), grpc_workers=max(counts) * 2 + 8,
            )
            server = build_server(settings).start()
            server.core.engine.load_base()
            server.set_ready(True)
            servers[name] = server
            channels.append(grpc.insecure_channel(server.address))
            stubs[name] = pb_grpc.ServingServiceStub(channels[-1])
        engine = servers["batched"].core.engine
        pipe = engine.pipeline_view(engine.base_unet, "")
        prompts = [f"{c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "triangle", "star")]
        diffusion = common_pb2.DiffusionSettings(steps=args.steps, width=args.size, height=args.size)

        def request(i: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(prompts=[prompts[i % len(prompts)]], seed=1000 + i, diffusion=diffusion)

        def round_of(stub, n: int) -> list[float]:
            """n clients, one request each, all at once; each client's latency."""
            latencies = [0.0] * n
            start = threading.Barrier(n)

            def client(i: int) -> None:
                start.wait()
                t0 = time.perf_counter()
                (out,) = list(stub.Generate(request(i)))
                assert out.image.png
                latencies[i] = time.perf_counter() - t0

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return latencies

        for n in counts:
            def anchor(n: int = n) -> None:
                pipe(prompt=[prompts[i % len(prompts)] for i in range(n)], num_inference_steps=args.steps, width=args.size,
                     height=args.size, generator=[torch.Generator().manual_seed(1000 + i) for i in range(n)], output_type="pil")

            sides = {
                f"anchor: diffusers batch {n}": anchor,
                f"service, batching (max {args.max_batch})": lambda n=n: round_of(stubs["batched"], n) and None,
                "service, serial (batch 1)": lambda n=n: round_of(stubs["serial"], n) and None,
            }
            names = list(sides)
            cmp = compare(sides, baseline=names[0], repeats=args.repeats, title=f"throughput, {n} concurrent clients, tiny SD "
                          f"{args.size}x{args.size}, {args.steps} steps: service images/s / anchor images/s")
            cmp.notes.append("speed-up column = images/s of the side / images/s of the anchor (same images per block)")
            cmp.print(unit="s", per=f"{n} images", speedup=True)
            vs_serial = Comparison(title=f"throughput, {n} clients: batching / serial service", baseline=names[2],
                                   times={names[1]: cmp.times[names[1]], names[2]: cmp.times[names[2]]},
                                   machine_before=cmp.machine_before, machine_after=cmp.machine_after)
            vs_serial.print(unit="s", per=f"{n} images", speedup=True)

        n, k = args.latency_clients, args.latency_requests
        print(f"== latency, {n} clients x {k} requests each (closed loop), tiny SD {args.size}x{args.size}, {args.steps} steps")
        for name in ("batched", "serial"):
            lat: list[float] = []
            lock = threading.Lock()

            def closed_loop(i: int, stub=stubs[name], lat=lat, lock=lock) -> None:
                for j in range(k):
                    t0 = time.perf_counter()
                    list(stub.Generate(request(i * k + j)))
                    with lock:
                        lat.append(time.perf_counter() - t0)

            threads = [threading.Thread(target=closed_loop, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lat.sort()
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            print(f"   {name:<10} p50 {p50:8.3f} s   p99 {p99:8.3f} s   p99/p50 {p99 / p50:6.2f}   ({len(lat)} requests)")
        for ch in channels:
            ch.close()
        for server in servers.values():
            server.stop(0)
            server.core.shutdown()


if __name__ == "__main__":
    main()
