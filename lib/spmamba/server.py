"""Start the SP-Mamba MONAI Label app (``apps/spmamba_app``) as a server, for ``spmamba serve`` / ``spmamba demo``.

MONAI Label is not imported here: the server runs as ``python -m monailabel.main start_server ...`` with the current
interpreter, so ``import spmamba`` stays light and works without the ``server`` extra.

The server runs in its own session (process group), so a Ctrl-C in the terminal reaches only the caller, which then
stops the server *and* what it started (start-up scoring, training subprocesses) with one SIGTERM to the group:
no child sees the SIGINT, so none prints a ``KeyboardInterrupt`` traceback. :func:`stop` does that.

Where MONAI Label writes: ``start_server`` puts its log in ``APP/logs/`` unless given ``--log_config``
(:func:`serve` passes one when ``log_dir`` is given, or ``log_file``'s folder), and the app publishes trained models in
``--conf model_dir`` (default ``APP/model``). Nothing else goes into the app folder: with DICOMweb studies
(``studies`` = ``http[s]://HOST/dicom-web``) the series are cached in ``--conf dicomweb_cache`` (default
``~/.cache/spmamba/dicomweb``), and MONAI Label's download of dcmqi into ``APP/bin`` is never run.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]


def is_remote(studies: PathLike) -> bool:
    """Whether ``studies`` is the URL of a DICOMweb server (``http[s]://HOST/dicom-web``) rather than a folder."""
    return str(studies).lower().startswith(("http://", "https://"))


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
    log_config: Optional[PathLike] = None,
) -> List[str]:
    """The exact command :func:`serve` runs (useful for docs and tests)."""
    app = Path(app_dir) if app_dir else default_app_dir()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", host, "--port", str(int(port))]
    if log_config:
        cmd += ["--log_config", str(log_config)]
    for key, value in (conf or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        cmd += ["--conf", str(key), str(value)]
    return cmd


def log_config(log_dir: PathLike, log_file: str = "app.log") -> Path:
    """A MONAI Label logging config (its own ``logging.json``) that writes ``log_dir/log_file`` instead of
    ``APP/logs/app.log``; returns its path (``log_dir/.monailabel-logging.json``)."""
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    template = None
    try:
        import importlib.util

        spec = importlib.util.find_spec("monailabel")
        if spec and spec.origin:
            candidate = Path(spec.origin).resolve().parent.parent / "logging.json"  # where start_server reads it
            template = candidate.read_text() if candidate.is_file() else None
    except Exception:  # noqa: BLE001 - fall back to a minimal config below
        template = None
    if template is None:
        template = json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"simple": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s:%(lineno)d) - %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"},
                         "file_handler": {"class": "logging.FileHandler", "formatter": "simple",
                                          "filename": "${LOGFILE}", "encoding": "utf-8"}},
            "root": {"level": "INFO", "handlers": ["console", "file_handler"]},
        })
    text = template.replace("${LOGDIR}", json.dumps(str(log_dir))[1:-1])
    text = text.replace("${LOGFILE}", json.dumps(str(log_dir / log_file))[1:-1])
    path = log_dir / ".monailabel-logging.json"
    path.write_text(text)
    return path


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, localhost, ::1)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def exposure_warning(host: str, auth: bool) -> Optional[str]:
    """The warning for a server bound to a network address without sign-in, else None."""
    if is_loopback(host) or auth:
        return None
    return (f"WARNING: serving on {host} without sign-in: anyone who can reach this machine can read the studies, "
            "change their curation and retrain the model. Turn sign-in on (--auth-issuer URL, docs/DEPLOY.md) or "
            "serve on 127.0.0.1 behind a TLS reverse proxy that signs users in.")


def auth_env(issuer: Optional[str], client_id: Optional[str] = None) -> Dict[str, str]:
    """MONAI Label's settings that turn its sign-in on for the OIDC ``issuer`` (a Keycloak realm URL or any OIDC
    issuer with a password grant), as environment variables for :func:`serve`; empty without an issuer."""
    if not issuer:
        return {}
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer.rstrip("/")}
    if client_id:
        env["MONAI_LABEL_AUTH_CLIENT_ID"] = client_id
    return env


def wait_until_ready(host: str, port: int, timeout: float = 120.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll ``GET /info/`` until the server answers (200, or 401/403 when sign-in is on); raises ``RuntimeError``
    on timeout or early exit."""
    url = f"http://{host}:{port}/info/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MONAI Label server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # up, and asking for sign-in
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


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> Optional[int]:
    """Stop a server started by :func:`serve` and everything it started (its process group: start-up scoring,
    training subprocesses): SIGTERM to the group (uvicorn shuts down cleanly; the Python children end without a
    traceback), SIGKILL after ``timeout`` seconds or at a second Ctrl-C. Returns the server's exit code."""
    def group_signal(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError:  # pragma: no cover - not a group leader (started elsewhere): the process alone
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    if proc.poll() is None:
        group_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C: no more waiting
            group_signal(signal.SIGKILL)
            proc.wait()
    group_signal(signal.SIGTERM)  # children that outlived the server (the group lives on while any does)
    return proc.returncode


def _wait_interruptibly(proc: subprocess.Popen, slice_s: float = 0.2) -> int:
    """``proc.wait()`` in short slices. The kernel may hand a Ctrl-C to any thread; when it picks the output-copying
    thread, a main thread blocked in ``waitpid`` never sees it (the Python handler runs only when the main thread
    runs Python code), and the server would be left running. Waking up every ``slice_s`` lets it run."""
    while True:
        try:
            return proc.wait(slice_s)
        except subprocess.TimeoutExpired:
            continue


def _pump(src: IO[bytes], dst: IO[str], quiet: threading.Event) -> None:
    """Copy the server's output to ``dst`` line by line until ``quiet`` is set, then only drain it (a full pipe
    would block the server)."""
    try:
        for raw in iter(src.readline, b""):
            if quiet.is_set():
                continue
            try:
                dst.write(raw.decode("utf-8", "replace"))
                dst.flush()
            except (OSError, ValueError):  # the terminal went away: keep draining
                quiet.set()
    except (OSError, ValueError):
        pass


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
    log_dir: Optional[PathLike] = None,
    on_ready: Optional[Callable[[str], None]] = None,
    output: Optional[IO[str]] = None,
) -> Union[int, subprocess.Popen]:
    """Run the MONAI Label server for ``studies`` on ``host:port`` (the folder is created when missing).

    ``conf`` becomes ``--conf key value`` pairs (see docs/APP.md: preset, device, slice_axis, encoder_weights,
    unflagged_normal, model, model_dir ...). MONAI Label's own log goes to ``log_dir/app.log`` (default: the folder of
    ``log_file`` when given, else MONAI Label's ``APP/logs``).

    ``block=False`` returns the ``Popen`` once ``GET /info/`` answers (``log_file``: where its output goes; stop it
    with :func:`stop`). ``block=True`` copies the server's output to ``output`` (default stderr), calls
    ``on_ready(url)`` once it answers, and runs until the server exits (returns its exit code). A
    ``KeyboardInterrupt`` in the caller (Ctrl-C: the terminal sends it to the caller only, the server has its own
    session) stops the server and its children quietly (:func:`stop`; their output is no longer copied) and is
    raised again, so the caller decides what to print.
    """
    if not port_is_free(host, port):
        raise RuntimeError(f"{host}:{port} is already in use: stop the other server or choose another port")
    if not is_remote(studies):
        Path(studies).mkdir(parents=True, exist_ok=True)  # the CLI refuses a missing folder before it gets here
    if log_dir is None and log_file is not None:
        log_dir = Path(log_file).resolve().parent
    cmd = server_command(studies, app_dir, host, port, conf, log_config(log_dir) if log_dir else None)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # this interpreter's scripts first on PATH: dcmqi's itkimage2segimage from the pinned wheel is found there, so
    # MONAI Label never tries to download dcmqi (an offline start), even when the environment is not activated
    bindir = str(Path(sys.executable).parent)
    full_env["PATH"] = os.pathsep.join([bindir] + [p for p in full_env.get("PATH", "").split(os.pathsep) if p])
    if not block:
        stdout = open(log_file, "ab") if log_file else None
        try:
            proc = subprocess.Popen(cmd, env=full_env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                                    start_new_session=True)
        finally:
            if stdout:
                stdout.close()
        try:
            wait_until_ready(host, port, ready_timeout, proc)
        except BaseException:
            stop(proc, 10)
            raise
        return proc
    quiet = threading.Event()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, output or sys.stderr, quiet), daemon=True)
    pump.start()
    try:
        wait_until_ready(host, port, ready_timeout, proc)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        rc = _wait_interruptibly(proc)
        pump.join(5)
        return rc
    except KeyboardInterrupt:
        quiet.set()
        stop(proc)
        raise
    except BaseException:  # e.g. it exited before it was ready: its last words are still copied
        stop(proc)
        pump.join(5)
        raise


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


def repo_root() -> Path | None:
    """The checkout the app comes from (it holds slicer_extension/ and docs/), if there is one."""
    try:
        root = default_app_dir().resolve().parents[1]
    except (FileNotFoundError, IndexError):
        return None
    return root if (root / "slicer_extension").is_dir() else None


def get_json(url: str, timeout: float = 10.0, token: Optional[str] = None):
    """The JSON answer of a GET on ``url`` (with the bearer ``token`` when given)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def next_steps(url: str, example_id: str = "STUDY_ID") -> list[str]:
    """What a user can do once the server answers (printed by serve and demo)."""
    root = repo_root()
    here = Path.cwd().resolve()

    def show(p: Path) -> str:
        try:
            return str(p.relative_to(here))
        except ValueError:
            return str(p)

    module = show(root / "slicer_extension" / "AnomalyDetection") if root else "slicer_extension/AnomalyDetection"
    docs = show(root / "docs") if root else "docs"
    return [
        "Next:",
        "  3D Slicer  use this project's \"Anomaly Detection\" module, not MONAI Label's own Slicer plugin (it",
        f"             cannot show float heatmaps): add {module} to Slicer's",
        f"             additional module paths ({docs}/SLICER.md) and connect it to {url}",
        f"  studies    curl -s '{url}/datastore/?output=all'",
        f"  detect     curl -s -X POST '{url}/infer/spmamba?image={example_id}&output=json'",
        f"  docs       {docs}/APP.md (REST API, --conf options), {docs}/CLI.md",
        "  stop       Ctrl-C",
    ]


def ready_report(tag: str, url: str, studies: Path, requested_model: Optional[Path], hint_model_option: bool) -> str:
    """What to print once the server answers: which studies and which model it serves (asked from the server
    itself), and what to do next (``spmamba serve`` / ``spmamba demo``; ``tag`` prefixes the lines)."""
    from spmamba.demo import describe_model

    remote = is_remote(studies)
    lines = [f"[{tag}] ready on {url} with the studies " + (f"of the PACS at {studies}" if remote else f"in {studies}")]
    info: dict = {}
    try:
        info = get_json(url + "/info/")
    except urllib.error.HTTPError as e:
        if e.code != 401:
            lines.append(f"[{tag}] (could not read {url}/info/: {e})")
        else:
            from spmamba.remote import SignInError, token_for

            try:
                token = token_for(url)
            except SignInError:
                token = None
            if token:
                info = get_json(url + "/info/", token=token)
            else:
                lines.append(f"[{tag}] sign-in is on: clients sign in (Slicer module, `spmamba login {url} --user "
                             "NAME`) before they see the studies")
    except Exception as e:  # noqa: BLE001 - the server is up; the summary is a courtesy
        lines.append(f"[{tag}] (could not read {url}/info/: {e})")
    sp = info.get("spmamba") or {}
    counts = sp.get("curation") or {}
    if counts:
        n = sum(v for v in counts.values() if isinstance(v, int))
        if n:
            lines[0] += f" ({n} studies: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ")"
        else:
            lines[0] += " (no studies yet: copy volumes into the folder or upload them from the Slicer module)"
    model = sp.get("model") or {}
    if model.get("ready") and model.get("path"):
        lines.append(f"[{tag}] serving model {model['path']}")
        try:
            lines.append(f"[{tag}]   {describe_model(model['path'])}")
        except Exception as e:  # noqa: BLE001
            lines.append(f"[{tag}]   version {model.get('version')} ({e})")
        if requested_model is not None and os.path.realpath(model["path"]) != os.path.realpath(requested_model):
            lines.append(f"[{tag}]   note: not {requested_model}: the app serves the newest of its --model and the "
                         "model it published last (MODEL_DIR/spmamba.pt, where training from Slicer goes)")
        if hint_model_option:
            lines.append(f"[{tag}]   serve another model with --model FILE (a `spmamba train` output)")
    elif sp:
        lines.append(f"[{tag}] no model yet: detection answers 409 until there is one. Train one with "
                     "`spmamba train --normal DIR --out model.pt` and serve it with --model model.pt, or mark studies "
                     "normal and train from the Slicer module")
    from spmamba.io import is_volume_file, volume_id

    if remote:
        ids = []
    else:
        ids = sorted(volume_id(p) for p in studies.iterdir()
                     if p.is_file() and is_volume_file(p) and not p.name.startswith(".")) if studies.is_dir() else []
    lines += next_steps(url, ids[0] if ids else "STUDY_ID")
    return "\n".join(lines)
