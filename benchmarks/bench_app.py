#!/usr/bin/env python
"""End-to-end REST latency of the SP-Mamba MONAI Label app, and heatmap writer timings.

    python benchmarks/bench_app.py [--presets fast paper] [--repeats 5] [--out benchmarks/results/app.json]

For each preset: a real ``monailabel start_server`` (127.0.0.1, free port, ``--conf model``), one 2 mm synthetic brain
volume (``spmamba.data.synthetic``) uploaded to the datastore, then ``POST /infer/spmamba``:

* *upload excluded*: ``?image=ID`` of the stored study;
* *upload included*: the same volume sent as the multipart ``file``;

each timed at the client (wall) and split with the server's own JSON ``latencies`` (read / model / regions / write).
The first request after start-up (model load) is reported separately as *cold*. The model is an untrained one of the preset
(latency does not depend on the weights; pass ``--model-fast/--model-paper`` to use real checkpoints).

Writers: ``spmamba.io.save_volume`` (what the app uses) against MONAI Label's ITK writer
(``monailabel.transform.writer.write_itk``, what its stock ``Writer`` uses), cold (first call in the process) and
warm, for the brain heatmap and for a 32x32x16 volume.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(work: Path, n_normal: int = 3):
    from spmamba.data.synthetic import make_abnormal, make_normal
    from spmamba.io import save_volume

    work.mkdir(parents=True, exist_ok=True)
    brain = make_abnormal(seed=7, index=0, spacing=2.0)
    brain_path = work / "brain.nii.gz"
    save_volume(brain.image, brain.affine, str(brain_path))
    normals = []
    for i in range(n_normal):
        s = make_normal(seed=7, index=i, spacing=2.0)
        p = work / f"normal_{i}.nii.gz"
        save_volume(s.image, s.affine, str(p))
        normals.append(str(p))
    return brain_path, brain.image.shape, normals


def quick_model(preset: str, normals, out: Path) -> Path:
    """An untrained model of ``preset`` with fixed thresholds: latency does not depend on the weights, and a real
    training step of the larger presets takes minutes on a shared 2-core CPU."""
    from spmamba.detector import Calibration, Detector
    from spmamba.models.spmamba import SPMamba

    det = Detector(SPMamba(preset), calibration=Calibration(pixel_threshold=0.5, volume_threshold=0.5), device="cpu")
    det.save(str(out))
    print(f"[bench] {preset}: untrained model -> {out}", file=sys.stderr)
    return out


def _median(xs):
    return round(statistics.median(xs), 3) if xs else None


def bench_server(preset: str, model: Path, brain: Path, work: Path, repeats: int) -> dict:
    import httpx

    from spmamba.server import serve

    port = _free_port()
    studies = work / f"studies_{preset}"
    log = work / f"server_{preset}.log"
    t0 = time.perf_counter()
    proc = serve(str(studies), host="127.0.0.1", port=port, block=False, log_file=str(log),
                 conf={"model": str(model), "model_dir": str(work / f"model_{preset}"), "auto_score": "false"})
    startup = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}"
    out: dict = {"preset": preset, "server_startup_s": round(startup, 2)}
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            data = brain.read_bytes()
            t = time.perf_counter()
            r = c.put("/datastore/image", params={"image": "brain"}, files={"file": (brain.name, data)})
            r.raise_for_status()
            out["upload_to_datastore_s"] = round(time.perf_counter() - t, 3)

            def one(kind: str):
                t = time.perf_counter()
                if kind == "stored":
                    r = c.post("/infer/spmamba", params={"image": "brain"})
                else:
                    r = c.post("/infer/spmamba", files={"file": (brain.name, data)})
                wall = time.perf_counter() - t
                r.raise_for_status()
                from requests_toolbelt.multipart.decoder import MultipartDecoder

                params, size = {}, 0
                for part in MultipartDecoder(r.content, r.headers["content-type"]).parts:
                    if b'name="params"' in part.headers.get(b"Content-Disposition", b""):
                        params = json.loads(part.content)
                    else:
                        size = len(part.content)
                lat = params.get("latencies", {})
                return {"wall": wall, **{k: lat.get(k) for k in ("read", "queue", "model", "regions", "write", "total")},
                        "result_bytes": size, "model_version": params.get("model_version")}

            cold = one("stored")
            out["cold"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in cold.items()}
            for kind in ("stored", "upload"):
                runs = [one(kind) for _ in range(repeats)]
                summary = {k: _median([r[k] for r in runs if r.get(k) is not None])
                           for k in ("wall", "read", "queue", "model", "regions", "write", "total")}
                summary["transfer_and_framework"] = round(summary["wall"] - summary["total"], 3)
                summary["result_bytes"] = runs[0]["result_bytes"]
                summary["all_wall"] = [round(r["wall"], 3) for r in runs]
                out["upload_excluded" if kind == "stored" else "upload_included"] = summary
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def bench_writers(shape, work: Path, repeats: int = 3) -> dict:
    """save_volume vs MONAI Label's ITK writer, in a fresh process so 'cold' includes ITK's lazy loading."""
    code = r"""
import json, sys, time, numpy as np
shape = tuple(json.loads(sys.argv[1])); work = sys.argv[2]; repeats = int(sys.argv[3])
aff = np.diag([2.0, 2.0, 2.0, 1.0])
res = {}
for name, shp in (("brain", shape), ("32x32x16", (32, 32, 16))):
    h = np.random.default_rng(0).random(shp, dtype=np.float32)
    from spmamba.io import save_volume
    for ext in (".nii.gz", ".nrrd"):
        ts = []
        for i in range(repeats):
            t = time.perf_counter(); save_volume(h, aff, f"{work}/sv_{name}{ext}"); ts.append(time.perf_counter() - t)
        res[f"save_volume {ext} {name}"] = {"first": ts[0], "warm": min(ts[1:] or ts)}
    t = time.perf_counter()
    from monailabel.transform.writer import write_itk
    imp = time.perf_counter() - t
    ts = []
    for i in range(repeats):
        t = time.perf_counter(); write_itk(h, f"{work}/itk_{name}.nii.gz", aff, np.float32, True); ts.append(time.perf_counter() - t)
    res[f"monailabel write_itk .nii.gz {name}"] = {"import": imp, "first": ts[0], "warm": min(ts[1:] or ts)}
print(json.dumps(res))
"""
    p = subprocess.run([sys.executable, "-c", code, json.dumps(list(shape)), str(work), str(repeats)],
                       capture_output=True, text=True, check=True)
    raw = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in raw.items()}


def markdown(result: dict) -> str:
    lines = [f"Volume: 2 mm synthetic brain, shape {result['shape']}; CPU: {result['cpu']}; "
             f"torch threads: {result['torch_threads']}; repeats: {result['repeats']} (median).", "",
             "| preset | request | wall s | read s | model s | regions s | write s | server total s | rest s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["servers"]:
        c = s["cold"]
        lines.append(f"| {s['preset']} | first request (cold, loads model) | {c['wall']:.2f} | {c['read']:.2f} | "
                     f"{c['model']:.2f} | {c['regions']:.2f} | {c['write']:.2f} | {c['total']:.2f} | "
                     f"{c['wall'] - c['total']:.2f} |")
        for key, label in (("upload_excluded", "?image=ID (upload excluded)"),
                           ("upload_included", "file upload (upload included)")):
            m = s[key]
            lines.append(f"| {s['preset']} | {label} | {m['wall']:.2f} | {m['read']:.2f} | {m['model']:.2f} | "
                         f"{m['regions']:.2f} | {m['write']:.2f} | {m['total']:.2f} | {m['transfer_and_framework']:.2f} |")
    lines += ["", "| writer | first call s | warm s |", "|---|---|---|"]
    for k, v in result["writers"].items():
        extra = f" (+ import {v['import']:.2f} s)" if "import" in v else ""
        lines.append(f"| {k} | {v['first']:.3f}{extra} | {v['warm']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["fast", "paper"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-fast", default=None)
    ap.add_argument("--model-paper", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "app.json"))
    args = ap.parse_args(argv)

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_app_"))
    brain, shape, normals = make_data(work)
    result = {
        "shape": list(shape), "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "servers": [],
        "command": "python benchmarks/bench_app.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for preset in args.presets:
        given = getattr(args, f"model_{preset}", None)
        model = Path(given) if given else quick_model(preset, normals, work / f"{preset}.pt")
        s = bench_server(preset, model, brain, work, args.repeats)
        print(json.dumps(s), file=sys.stderr)
        result["servers"].append(s)
    result["writers"] = bench_writers(shape, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
