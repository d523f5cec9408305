"""Start and stop a real MONAI Label server on 127.0.0.1 (free port) for the Slicer module's tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Iterator, Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def monailabel_server(app_dir: str, studies: str, log_path: str, conf: Optional[Dict[str, str]] = None,
                      timeout: float = 120.0) -> Iterator[str]:
    """``python -m monailabel.main start_server --app APP --studies DIR -i 127.0.0.1 -p PORT``; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app_dir, "--studies", studies,
           "-i", "127.0.0.1", "-p", str(port)]
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(log_path), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited early ({proc.returncode}):\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(url + "/info/", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not start in {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and any training subprocess (own session)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]
