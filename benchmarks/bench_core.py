"""Core benchmarks (issue 2): selective scan, prototype matching, model forward throughput and FLOP rate.

    python benchmarks/bench_core.py [--quick] [--out results.json]

Every speed figure is a ratio against a reference measured in the same run on the same machine.
Prints a markdown table; docs/BENCHMARKS.md quotes it with this command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))

from spmamba.models import SPMamba, prototype_distance, prototype_distance_loop  # noqa: E402
from spmamba.ops import selective_scan, selective_scan_reference  # noqa: E402


def timeit(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scan_inputs(b, d, L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5
    A = -(torch.rand(d, N, generator=g) * 15 + 1)  # S4D-like range -1..-16
    B = torch.randn(b, N, L, generator=g)
    C = torch.randn(b, N, L, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    return [x.requires_grad_() for x in (u, delta, A, B, C, D, bias)]


def bench_scan(b, d, L, N, repeats, with_sequential):
    xs = scan_inputs(b, d, L, N)
    u, delta, A, B, C, D, bias = xs

    def ours():
        y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
        torch.autograd.grad(y.sum(), xs)

    def mambapy():
        from mambapy.pscan import pscan

        dt = torch.nn.functional.softplus(delta + bias.view(1, -1, 1)).transpose(1, 2)  # (b, L, d)
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, L, d, N)
        bx = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)
        hs = pscan(dA, bx)
        y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1) + D * u.transpose(1, 2)
        torch.autograd.grad(y.sum(), xs)

    def sequential():
        y = selective_scan_reference(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
        torch.autograd.grad(y.sum(), xs)

    res = {"shape": [b, d, L, N], "ours_s": timeit(ours, repeats), "mambapy_s": timeit(mambapy, repeats)}
    if with_sequential:
        res["sequential_s"] = timeit(sequential, 1, warmup=False)  # minutes at L=4096: one run
    return res


def bench_prototypes(batch=16, size=8, channels=512, k=5):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, size, size, channels, generator=g)
    protos = torch.randn(size * size, k, channels, generator=g)
    fast = timeit(lambda: prototype_distance(feats, protos, 3), 20)
    loop = timeit(lambda: prototype_distance_loop(feats, protos, 3), 1, warmup=False)
    return {"vectorised_s": fast, "loop_s": loop, "speedup": loop / fast}


def matmul_gflops(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def scan_flops_per_slice(model: SPMamba) -> float:
    """Analytic FLOPs of the selective scans (the counter sees only matmuls/convs): per token, channel and state
    ~9 flops (dt*A, exp, dt*u*B, a*h+b, C*h+sum)."""
    from spmamba.models.mamba_decoder import SS2D

    total = 0
    for m in model.modules():
        if isinstance(m, SS2D):
            total += 9 * m.size * m.size * m.n_directions * m.d_inner * m.d_state
    return float(total)


def bench_model_child(preset: str, batch: int, repeats: int) -> dict:
    """Runs in a fresh process so that peak RSS belongs to this preset alone."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = SPMamba(preset).eval()
    S = model.config.image_size
    x = torch.rand(batch, 1, S, S)
    with torch.inference_mode():
        def run():
            out = model(x)
            model.image_score(model.anomaly_map(out))
        t = timeit(run, repeats)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x[:1])
        counted = counter.get_total_flops()
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited across fork/exec)
    with open("/proc/self/status") as f:
        peak_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    flops = counted + scan_flops_per_slice(model)
    return {"preset": preset, "image_size": S, "batch": batch, "seconds_per_batch": t, "slices_per_s": batch / t,
            "gflop_per_slice": flops / 1e9, "gflop_counted_per_slice": counted / 1e9,
            "achieved_gflops": flops * batch / t / 1e9, "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller scan shape, no sequential reference")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--presets", default="fast,paper", help="model presets to time ('' = none)")
    args = ap.parse_args()
    if args.child:
        preset, batch, repeats = args.child.split(":")
        print(json.dumps(bench_model_child(preset, int(batch), int(repeats))))
        return

    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg()[0]}
    shape = (2, 64, 1024, 16) if args.quick else (2, 256, 4096, 16)
    info["scan"] = bench_scan(*shape, repeats=3, with_sequential=not args.quick)
    info["prototypes"] = bench_prototypes()
    info["matmul_gflops"] = matmul_gflops()
    info["models"] = []
    for preset in [p for p in args.presets.split(",") if p]:
        batch, repeats = (16, 3) if preset == "fast" else (4, 2)
        out = subprocess.run([sys.executable, __file__, "--child", f"{preset}:{batch}:{repeats}"],
                             capture_output=True, text=True, check=True)
        info["models"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    info["load_avg_end"] = os.getloadavg()[0]

    s = info["scan"]
    print(f"machine: {info['machine']}, torch {info['torch']}, {info['threads']} threads, "
          f"load average {info['load_avg_start']:.2f} -> {info['load_avg_end']:.2f}\n")
    print("| selective scan fwd+bwd (batch, dim, L, N) | time | vs mambapy pscan | vs sequential loop |")
    print("|---|---|---|---|")
    seq = f"{s['sequential_s'] / s['ours_s']:.0f}x faster ({s['sequential_s']:.1f} s)" if "sequential_s" in s else "-"
    print(f"| {tuple(s['shape'])} | {s['ours_s']:.2f} s | {s['mambapy_s'] / s['ours_s']:.2f}x faster "
          f"({s['mambapy_s']:.2f} s) | {seq} |\n")
    p = info["prototypes"]
    print(f"prototype matching, batch 16, 8x8x512, 5 prototypes: {p['vectorised_s'] * 1e3:.2f} ms vectorised vs "
          f"{p['loop_s'] * 1e3:.0f} ms published loop = {p['speedup']:.0f}x\n")
    print(f"plain float32 matmul 2048^3 on this machine: {info['matmul_gflops']:.1f} GFLOP/s\n")
    print("| preset | input | slices/s | GFLOP/slice (conv+matmul / +scan) | achieved GFLOP/s | vs matmul | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for m in info["models"]:
        print(f"| {m['preset']} | {m['image_size']}^2 | {m['slices_per_s']:.2f} | {m['gflop_counted_per_slice']:.2f} / "
              f"{m['gflop_per_slice']:.2f} | {m['achieved_gflops']:.1f} | "
              f"{m['achieved_gflops'] / info['matmul_gflops'] * 100:.0f}% | {m['peak_rss_mb']:.0f} MB |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
