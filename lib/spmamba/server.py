"""Start the SP-Mamba MONAI Label app (``apps/spmamba_app``) as a server, for ``spmamba serve`` / ``spmamba demo``.

MONAI Label is not imported here: the server runs as ``python -m monailabel.main start_server ...`` with the current
interpreter, so ``import spmamba`` stays light and works without the ``server`` extra.
"""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]


def default_app_dir() -> Path:
    """``apps/spmamba_app`` of this checkout (the app ships with the repository, next to ``lib/``)."""
    env = os.environ.get("SPMAMBA_APP_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "apps" / "spmamba_app"
        if (candidate / "main.py").is_file():
            return candidate
    raise FileNotFoundError(
        "cannot find apps/spmamba_app (the MONAI Label app); pass app_dir=... or set SPMAMBA_APP_DIR"
    )


def server_command(
    studies: PathLike,
    app_dir: Optional[PathLike] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    conf: Optional[Mapping[str, object]] = None,
) -> List[str]:
    """The exact command :func:`serve` runs (useful for docs and tests)."""
    app = Path(app_dir) if app_dir else default_app_dir()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", host, "--port", str(int(port))]
    for key, value in (conf or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        cmd += ["--conf", str(key), str(value)]
    return cmd


def wait_until_ready(host: str, port: int, timeout: float = 120.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll ``GET /info/`` until the server answers 200; raises ``RuntimeError`` on timeout or early exit."""
    url = f"http://{host}:{port}/info/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MONAI Label server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the MONAI Label server did not answer {url} within {timeout:.0f} s")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(
    studies: PathLike,
    app_dir: Optional[PathLike] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    conf: Optional[Dict[str, object]] = None,
    block: bool = True,
    ready_timeout: float = 180.0,
    env: Optional[Mapping[str, str]] = None,
    log_file: Optional[PathLike] = None,
) -> Union[int, subprocess.Popen]:
    """Run the MONAI Label server for ``studies`` on ``host:port``.

    ``conf`` becomes ``--conf key value`` pairs (see docs/APP.md: preset, device, slice_axis, encoder_weights,
    unflagged_normal, model, ...). ``block=True`` runs until the server stops (Ctrl-C stops it) and returns its exit
    code; ``block=False`` returns the ``Popen`` once ``GET /info/`` answers (stop it with ``terminate()``).
    """
    if not port_is_free(host, port):
        raise RuntimeError(f"{host}:{port} is already in use: stop the other server or choose another port")
    Path(studies).mkdir(parents=True, exist_ok=True)
    cmd = server_command(studies, app_dir, host, port, conf)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    stdout = open(log_file, "ab") if log_file else None
    proc = subprocess.Popen(cmd, env=full_env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    if not block:
        try:
            wait_until_ready(host, port, ready_timeout, proc)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        return proc
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if stdout:
            stdout.close()


def write_curation_csv(path: PathLike, states: Union[Mapping[str, str], Iterable[Tuple[str, str]]]) -> Path:
    """Write ``id,curation`` rows (normal/abnormal/excluded) that the app applies at start-up to studies that
    have no curation state yet (``STUDIES/curation.csv`` by default)."""
    items = states.items() if isinstance(states, Mapping) else states
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "curation"])
        for sid, state in items:
            w.writerow([sid, state])
    return path
