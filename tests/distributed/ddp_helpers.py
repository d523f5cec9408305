"""Helpers of the multi-process tests: free ports on 127.0.0.1, ``torchrun`` runs that are always cleaned up. The
launched processes import this checkout's library (``PYTHONPATH``). (A module of its own, not conftest.py: every test
folder has a conftest, and ``from conftest import`` gets whichever was imported last.)"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


HERE = Path(__file__).resolve().parent
LIB = HERE.parents[1] / "lib"
for extra in (HERE, HERE.parent / "core"):  # ddp_worker, core_helpers
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict:
    """The environment of a launched process: this checkout's library first, one torch thread, gloo on loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(LIB), str(HERE), str(HERE.parent / "core")]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(*args: str, nproc: int = 2, nnodes: int = 1, port: Optional[int] = None) -> list:
    """``torchrun`` with a c10d rendezvous on 127.0.0.1:PORT (a free one by default)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", "--rdzv-id=spmamba-test",
            *args]


def start(cmd: Sequence[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so that ``stop`` ends it with every child)."""
    return subprocess.Popen(list(cmd), cwd=str(cwd), env=process_env(**env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def finish(procs: Sequence[subprocess.Popen], logs: Sequence[Path], timeout: float = 240) -> None:
    """Wait for every process (each killed, with its children, if it outlives ``timeout``); fail with their logs
    unless each exited 0."""
    try:
        for p in procs:
            p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            stop(p)
    bad = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode != 0]
    assert not bad, "\n\n".join(f"exit {rc}: {log}\n" + log.read_text()[-4000:] for rc, log in bad)
