"""Serving under load on CPU: `blade serve` (KServe, v2 gRPC, dynamic batching) answering 32 concurrent clients,
against the same requests sent one at a time; throughput, p50/p99 latency, batch sizes, utilization.

The model: zoo bert at --size (default base; dynamic batch and seq), compiled with blade's defaults and saved as an
artifact; the server is a `blade serve` child process. The requests: --distinct input sets (seeded), each of
--seq tokens and 1-4 rows (sizes drawn from --batch-sizes); each client sends --per-client requests, each a random
input set, over its own gRPC channel (tritonclient.grpc.aio, all clients in this process).
* one_at_a_time  one client, each request sent after the last one's answer (--serial requests), against a server
                 started with --max-delay-ms 0 (a lone request never waits for company: the serial client's best)
* one_at_a_time_windowed  the same, against the concurrent run's server (each lone request waits out the window)
* concurrent     --clients clients at once, each its --per-client requests back to back
Every answer is checked against the artifact run alone on that request's inputs in this process (bitwise, and the
largest relative error if not): a request answered with another's result would show.
Throughput = requests (and rows) / wall seconds; latency = send to answer, per request. Utilization = IR FLOPs of
the rows served / wall seconds / the fp32 matmul peak measured in this run (blade.perf.peaks.measure).

    python bench/serve_cpu.py [--size base] [--seq 16] [--clients 32] [--per-client 50] [--out bench/results/serve_cpu]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _repo_path  # noqa: F401 - import blade from this checkout
import numpy as np
import torch

import blade
import blade.models as zoo
import blade.target
from blade.perf.peaks import measure
from blade.runtime.guards import check_inputs
from blade.runtime.profile import model_work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, http: int, grpc: int, delay_ms: float, max_batch: int, log) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "blade", "serve", str(artifact), "--name", "bert",
                                "--http-port", str(http), "--grpc-port", str(grpc),
                                "--max-delay-ms", str(delay_ms), "--max-batch", str(max_batch)],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/bert/ready", timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server never became ready")


def batch_stats(http: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("blade_batch_rows_sum", "blade_batch_rows_count", "blade_batch_requests_sum"):
            if line.startswith(name + "{"):
                values[name] = float(line.split()[-1])
    return values


async def run_clients(grpc_url: str, plan: list[list[int]], inputs, expected) -> tuple[float, list, list]:
    """Each client sends its planned input ids back to back; (wall seconds, latencies, check results)."""
    import tritonclient.grpc.aio as grpcclient

    latencies, checks = [], []

    async def client(ids):
        async with grpcclient.InferenceServerClient(grpc_url) as c:
            for i in ids:
                items = []
                for name, tensor in zip(("input_ids", "attention_mask"), inputs[i]):
                    item = grpcclient.InferInput(name, list(tensor.shape), "INT64")
                    item.set_data_from_numpy(tensor.numpy())
                    items.append(item)
                start = time.perf_counter()
                result = await c.infer("bert", items)
                latencies.append(time.perf_counter() - start)
                checks.append(compare(result, expected[i]))

    start = time.perf_counter()
    await asyncio.gather(*(client(ids) for ids in plan))
    return time.perf_counter() - start, latencies, checks


def compare(result, expected) -> float:
    """0.0 when every output is bitwise the expected one, else the largest relative error (inf if missing)."""
    worst = 0.0
    for k, want in enumerate(expected):
        got = result.as_numpy(f"output_{k}")
        if got is None or got.shape != tuple(want.shape):
            return float("inf")
        if not np.array_equal(got, want.numpy()):
            ref = want.numpy().astype(np.float64)
            worst = max(worst, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)))
    return worst


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=zoo.SIZES)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,1,2,3,4", help="request rows drawn uniformly from these")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--serial", type=int, default=200, help="requests in the one-at-a-time run")
    parser.add_argument("--distinct", type=int, default=160, help="distinct input sets the requests draw from")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--out", default="bench/results/serve_cpu")
    args = parser.parse_args()

    rng = random.Random(0)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model, example_inputs, dynamic_shapes = zoo.get("bert", size=args.size)
    start = time.perf_counter()
    compiled = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes)
    print(f"compiled bert {args.size} in {time.perf_counter() - start:.1f} s ({compiled.backend})", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="blade-serve-bench-"))
    artifact = workdir / "bert.blade"
    compiled.save(artifact)
    inputs = [zoo.sample_inputs("bert", size=args.size, batch=rng.choice(sizes), seq=args.seq, seed=1000 + i)
              for i in range(args.distinct)]
    expected = [compiled.run_flat(list(x)) for x in inputs]
    graph = compiled.graph
    one_row = [t[:1] for t in inputs[0]]
    row_flops = model_work(graph, check_inputs(graph.inputs, graph.dims, one_row))[0]
    del model
    peaks = measure(blade.target.detect())
    print(f"fp32 peak {peaks.matmul['fp32'] / 1e9:.0f} GFLOP/s", flush=True)

    runs = {}
    serial_plan = [[rng.randrange(args.distinct) for _ in range(args.serial)]]
    concurrent_plan = [[rng.randrange(args.distinct) for _ in range(args.per_client)] for _ in range(args.clients)]
    # the serial client gets a server that never waits for others to join (--max-delay-ms 0): its best case
    for name, plan, delay_ms in (("one_at_a_time", serial_plan, 0.0),
                                 ("one_at_a_time_windowed", serial_plan, args.max_delay_ms),
                                 ("concurrent", concurrent_plan, args.max_delay_ms)):
        http, grpc = free_port(), free_port()
        log = open(workdir / f"server_{name}.log", "w")
        server = start_server(artifact, http, grpc, delay_ms, args.max_batch, log)
        url = f"127.0.0.1:{grpc}"
        try:
            asyncio.run(run_clients(url, [[0, 1, 2]], inputs, expected))  # warm the server and the channel
            before = batch_stats(http)
            seconds, latencies, checks = asyncio.run(run_clients(url, plan, inputs, expected))
            after = batch_stats(http)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            log.close()
        rows = sum(inputs[i][0].shape[0] for ids in plan for i in ids)
        calls = after["blade_batch_rows_count"] - before["blade_batch_rows_count"]
        runs[name] = {
            "clients": len(plan), "requests": len(latencies), "rows": rows, "seconds": seconds,
            "max_delay_ms": delay_ms, "requests_per_s": len(latencies) / seconds, "rows_per_s": rows / seconds,
            "p50_ms": percentile(latencies, 0.5) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3,
            "calls": calls, "rows_per_call": (after["blade_batch_rows_sum"] - before["blade_batch_rows_sum"]) / calls,
            "requests_per_call": (after["blade_batch_requests_sum"] - before["blade_batch_requests_sum"]) / calls,
            "utilization": row_flops * rows / seconds / peaks.matmul["fp32"],
            "bitwise_equal": sum(c == 0.0 for c in checks), "worst_rel_err": max(checks),
            "lost": sum(len(ids) for ids in plan) - len(latencies),
        }
        r = runs[name]
        print(f"{name}: {r['requests_per_s']:.1f} req/s, {r['rows_per_s']:.1f} rows/s, p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, {r['rows_per_call']:.1f} rows/call, util {r['utilization']:.0%}, "
              f"bitwise {r['bitwise_equal']}/{r['requests']}, worst {r['worst_rel_err']:.2e}", flush=True)
    ratio = runs["concurrent"]["requests_per_s"] / runs["one_at_a_time"]["requests_per_s"]
    machine = {"cpu": blade.target.detect().name, "cores": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "blade": blade.__version__, "backend": compiled.backend,
               "fp32_peak_gflops": peaks.matmul["fp32"] / 1e9}
    result = {"machine": machine, "args": vars(args), "runs": runs, "throughput_ratio": ratio,
              "row_gflop": row_flops / 1e9}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    print(f"throughput ratio concurrent / one at a time: {ratio:.2f}x; wrote {out}.md", flush=True)
    return 0


def render(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = [f"# blade serve under load: zoo bert {a['size']}, seq {a['seq']}, CPU",
             "",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, blade {m['blade']}; "
             f"artifact backend {m['backend']}; fp32 matmul peak measured in this run {m['fp32_peak_gflops']:.0f} "
             "GFLOP/s. Server and clients share the machine.",
             "",
             f"Requests: rows drawn from {a['batch_sizes']}, {a['seq']} tokens, {a['distinct']} distinct input sets; "
             f"server `--max-batch {a['max_batch']}`, gRPC; the one-at-a-time client gets a server that never waits to "
             "join requests (`--max-delay-ms 0`), the concurrent clients one with the window below. "
             f"One row is {result['row_gflop']:.2f} GFLOP (blade's IR).",
             "",
             "| run | clients | server delay ms | requests | req/s | rows/s | p50 ms | p99 ms | rows/call | requests/call | utilization | "
             "bitwise equal to alone | lost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        worst = "" if r["worst_rel_err"] == 0 else f" (worst rel. error {r['worst_rel_err']:.1e})"
        lines.append(f"| {name} | {r['clients']} | {r['max_delay_ms']:g} | {r['requests']} | {r['requests_per_s']:.1f} | {r['rows_per_s']:.1f} "
                     f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rows_per_call']:.1f} | "
                     f"{r['requests_per_call']:.1f} | {r['utilization']:.0%} | {r['bitwise_equal']}/{r['requests']}"
                     f"{worst} | {r['lost']} |")
    lines += ["", f"Throughput, concurrent over one at a time (the serial client's best server): "
              f"**{result['throughput_ratio']:.2f}x**.", "",
              f"Reproduce: `python bench/serve_cpu.py --size {a['size']} --seq {a['seq']} --clients {a['clients']} "
              f"--per-client {a['per_client']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
