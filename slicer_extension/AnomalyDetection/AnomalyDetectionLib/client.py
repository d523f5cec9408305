"""HTTP client for the SP-Mamba MONAI Label app (standard MONAI Label 0.8.5 REST endpoints).

Standard library only (urllib, json): it runs in Slicer's Python, in plain Python and in tests, and it never
imports Qt, Slicer or the ``spmamba`` library.  Every call has a timeout; every failure becomes a
:class:`ServerError` whose message says what went wrong *and what to do*, ready for the module's status line.

Endpoints used (see ``monailabel/endpoints/*.py``):

====================================  ===============================================================
``GET  /info/``                       models, strategies, trainers, ``train_stats``, datastore counts
``POST /infer/{model}?image=ID``      multipart form: ``params`` (JSON) [+ ``file``]; answer multipart
                                      ``params`` (JSON) + ``image`` (float32 heatmap .nii.gz/.nrrd)
``PUT  /datastore/image?image=ID``    multipart form: ``params`` (JSON) + ``file``
``GET  /datastore/image?image=ID``    the study's image file
``GET/PUT /datastore/image/info``     per-study info; PUT merges form field ``info`` (JSON)
``GET  /datastore/?output=all``       every study with its info (curation state)
``POST /activelearning/{strategy}``   JSON body (params) -> ``{"id": ...}`` or ``{}``
``POST /train/{model}``               JSON body (params); 429 when a training is already running
``GET  /train/?check_if_running=1``   404 when no training runs
``DELETE /train/``                    stop the running training
``GET  /model/versions``              the served model and the versions the app keeps (SP-Mamba app)
``POST /model/rollback?version=V``    serve a kept version again (SP-Mamba app; 404 unknown, 409 training)
``GET  /auth/``                       whether the server has sign-in on
``POST /auth/token``                  form ``username``, ``password`` -> ``{"access_token": ...}``
====================================  ===============================================================

Sign-in: with :meth:`AnomalyClient.login` the client keeps the bearer token (and, in memory only, the password, to
sign in again when the short-lived token expires) and sends it with every call. Remembering the password between
sessions is the caller's choice (:mod:`.credentials`: the system keyring or nothing).
"""
from __future__ import annotations

import json
import mimetypes
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

#: Curation states stored under ``info["curation"]`` of a study in the MONAI Label datastore.
CURATION_STATES = ("normal", "abnormal", "excluded")
CURATION_KEY = "curation"
UNREVIEWED = "unreviewed"

DEFAULT_MODEL = "spmamba"
DEFAULT_URL = "http://127.0.0.1:8000"
#: MONAI Label task states of a training that is under way: queued (its process not started yet) or running
ACTIVE_TRAIN_STATES = ("SUBMITTED", "RUNNING")


class ServerError(Exception):
    """A failed server call, with a message for the user that says what to do.

    ``kind`` is one of ``unreachable``, ``timeout``, ``wrong_url``, ``no_model``, ``not_found``,
    ``refused``, ``auth`` (sign in), ``forbidden`` (a role is missing), ``bad_request``, ``server``,
    ``bad_response``; ``status`` is the HTTP status (or None).
    """

    def __init__(self, message: str, kind: str = "server", status: Optional[int] = None, detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.detail = detail


@dataclass
class DetectionResult:
    """What ``POST /infer/{model}`` returned: the params JSON and the downloaded heatmap file (or None)."""

    params: Dict[str, Any]
    heatmap_path: Optional[str]
    image_id: Optional[str] = None

    @property
    def score(self) -> Optional[float]:
        return _first_number(self.params, ("score", "volume_score"))

    @property
    def threshold(self) -> Optional[float]:
        return _first_number(self.params, ("threshold", "volume_threshold"))

    @property
    def pixel_threshold(self) -> Optional[float]:
        return _first_number(self.params, ("pixel_threshold", "heatmap_threshold"))

    @property
    def abnormal(self) -> Optional[bool]:
        if "abnormal" in self.params:
            return bool(self.params["abnormal"])
        verdict = self.params.get("verdict")
        if isinstance(verdict, str):
            return verdict.lower() == "abnormal"
        if self.score is not None and self.threshold is not None:
            return self.score > self.threshold
        return None

    @property
    def verdict(self) -> str:
        verdict = self.params.get("verdict")
        if isinstance(verdict, str) and verdict:
            return verdict
        abnormal = self.abnormal
        return "unknown" if abnormal is None else ("abnormal" if abnormal else "normal")

    @property
    def alignment_text(self) -> str:
        """'' for models without alignment; else e.g. 'aligned to the model's mni152 (similarity 0.71), then deformed
        (similarity 0.89)' (models that align with the deformable stage; or why it was left out for this study)."""
        al = self.params.get("alignment")
        if not isinstance(al, dict):
            return ""
        sim = al.get("similarity")
        detail = f" (similarity {sim:.2f})" if isinstance(sim, (int, float)) else ""
        text = f"aligned to the model's {al.get('reference') or 'reference'}{detail}"
        deformed = al.get("deformable")
        if isinstance(deformed, dict):
            if deformed.get("used"):
                dsim = deformed.get("similarity")
                text += ", then deformed" + (f" (similarity {dsim:.2f})" if isinstance(dsim, (int, float)) else "")
            else:
                text += f"; not deformed: {deformed.get('why') or 'the deformation was left out'}"
        return text

    @property
    def model_version(self) -> Optional[str]:
        for key in ("model_version", "version"):
            if self.params.get(key):
                return str(self.params[key])
        return None

    @property
    def regions(self) -> Optional[List[Dict[str, Any]]]:
        """The server's regions of ``heatmap > pixel_threshold`` (``label``, ``n_voxels``, ``volume_mm3``, ``peak``,
        ``mean``, ``centroid_voxel`` [i, j, k], ``centroid_ras``; strongest peak first), or None when the server
        sends none (an older app, or a method without regions)."""
        regions = self.params.get("regions")
        if not isinstance(regions, list):
            return None
        return [r for r in regions if isinstance(r, dict)]

    @property
    def n_regions(self) -> Optional[int]:
        """How many regions the server found in all (its list may hold only the strongest ``top_regions``)."""
        n = self.params.get("n_regions")
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            return int(n)
        regions = self.regions
        return None if regions is None else len(regions)


def _first_number(d: Dict[str, Any], keys: Tuple[str, ...]) -> Optional[float]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


# ----------------------------------------------------------------------------------------------------------------
# multipart helpers (stdlib has no multipart encoder; the answer of /infer is multipart/form-data)
# ----------------------------------------------------------------------------------------------------------------
def encode_multipart(fields: Dict[str, str], files: Dict[str, str]) -> Tuple[bytes, str]:
    """Encode text ``fields`` and ``files`` (name -> path) as multipart/form-data; returns (body, content type)."""
    boundary = "----spmamba-" + uuid.uuid4().hex
    chunks: List[bytes] = []
    for name, value in fields.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    for name, path in files.items():
        filename = os.path.basename(path)
        ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def decode_multipart(body: bytes, content_type: str) -> List[Dict[str, Any]]:
    """Split a multipart body into parts: ``[{"name", "filename", "content_type", "data": bytes}]``."""
    boundary = None
    for item in content_type.split(";"):
        item = item.strip()
        if item.lower().startswith("boundary="):
            boundary = item.split("=", 1)[1].strip().strip('"')
    if not boundary:
        raise ServerError("The server's answer is multipart without a boundary.", kind="bad_response")
    delimiter = b"--" + boundary.encode()
    parts: List[Dict[str, Any]] = []
    for raw in body.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            break  # closing delimiter
        raw = raw[2:] if raw.startswith(b"\r\n") else raw
        head, _, data = raw.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: Dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        disposition = headers.get("content-disposition", "")
        name = filename = None
        for item in disposition.split(";"):
            item = item.strip()
            if item.startswith("name="):
                name = item[5:].strip('"')
            elif item.startswith("filename="):
                filename = item[9:].strip('"')
        parts.append(
            {"name": name, "filename": filename, "content_type": headers.get("content-type", ""), "data": data}
        )
    return parts


def _result_suffix(filename: Optional[str], default: str) -> str:
    """The file type of a file the server sent (a heatmap, or a study's image: volumes and 2-D images)."""
    name = (filename or "").lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.endswith(suffix):
            return suffix
    return default


# ----------------------------------------------------------------------------------------------------------------
# the client
# ----------------------------------------------------------------------------------------------------------------
class AnomalyClient:
    """Blocking client with timeouts; the module runs its calls in worker threads (see ``tasks.TaskRunner``).

    :param url: server base URL, e.g. ``http://127.0.0.1:8000``
    :param timeout: seconds for quick calls (info, datastore, curation, training control)
    :param long_timeout: seconds for uploads, downloads and inference
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 10.0, long_timeout: float = 600.0,
                 token: Optional[str] = None):
        self.url = normalize_url(url)
        self.timeout = float(timeout)
        self.long_timeout = float(long_timeout)
        self.token = token
        self.username: Optional[str] = None
        self._password: Optional[str] = None  # in memory only: to sign in again when the token expires

    # ---------------------------------------------------------------------------------------------- sign-in
    def auth_enabled(self) -> bool:
        """``GET /auth/``: whether the server asks for sign-in."""
        res = self._json("GET", "/auth/", what="GET /auth/")
        return bool(isinstance(res, dict) and res.get("enabled"))

    def login(self, username: str, password: str) -> None:
        """``POST /auth/token``: sign in; the token is sent with every later call."""
        body = urllib.parse.urlencode({"username": username, "password": password}).encode()
        self.token = None
        _, _, data = self._request("POST", "/auth/token", body=body,
                                   content_type="application/x-www-form-urlencoded", what="POST /auth/token",
                                   retry_login=False)
        try:
            token = json.loads(data.decode("utf-8") or "{}").get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise ServerError(f"The server at {self.url} has sign-in off: no need to sign in.", kind="bad_response")
        self.token, self.username, self._password = str(token), username, password

    def logout(self) -> None:
        self.token = self.username = self._password = None

    # ---------------------------------------------------------------------------------------------- transport
    def _request(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]] = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        timeout: Optional[float] = None,
        what: str = "",
        retry_login: bool = True,
    ) -> Tuple[int, Dict[str, str], bytes]:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json, multipart/form-data, */*")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        timeout = self.timeout if timeout is None else timeout
        what = what or f"{method} {path}"
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return resp.status, headers, resp.read()
        except urllib.error.HTTPError as e:
            payload = b""
            try:
                payload = e.read()
            except Exception:  # noqa: BLE001 - best effort to read the error body
                pass
            if e.code == 401 and retry_login and self.token and self.username and self._password:
                self.login(self.username, self._password)  # the token expired: sign in again, once
                return self._request(method, path, query, body, content_type, timeout, what, retry_login=False)
            raise self._http_error(e.code, payload, what) from None
        except (socket.timeout, TimeoutError):
            raise ServerError(
                f"The server at {self.url} did not answer within {timeout:.0f} s ({what}). It may be busy (training "
                "or inferring on a large volume): try again, or check the server's log.",
                kind="timeout",
            ) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerError(
                    f"The server at {self.url} did not answer within {timeout:.0f} s ({what}): try again, or check "
                    "the server's log.",
                    kind="timeout",
                ) from None
            if isinstance(reason, socket.gaierror):
                raise ServerError(
                    f"Unknown host in {self.url}: check the server URL (for example {DEFAULT_URL}).",
                    kind="wrong_url",
                ) from None
            raise ServerError(
                f"Cannot reach the server at {self.url} ({reason}). Is it running? Start it with "
                f"`spmamba serve` (or `monailabel start_server --app apps/spmamba_app ...`) and check the URL.",
                kind="unreachable",
            ) from None
        except (ConnectionError, OSError) as e:
            raise ServerError(
                f"Cannot reach the server at {self.url} ({e}). Is it running? Check the URL.", kind="unreachable"
            ) from None

    def _http_error(self, status: int, payload: bytes, what: str) -> ServerError:
        detail = ""
        try:
            j = json.loads(payload.decode("utf-8"))
            detail = j.get("detail", j) if isinstance(j, dict) else j
            if not isinstance(detail, str):
                detail = json.dumps(detail)
        except Exception:  # noqa: BLE001 - error bodies may be plain text
            detail = payload.decode("utf-8", "replace").strip()[:500]
        low = detail.lower()
        suffix = f" Server said: {detail}" if detail else ""
        if status == 404 and ("not found" == low or not detail) and what.startswith("GET /info"):
            return ServerError(
                f"{self.url} answers but is not a MONAI Label server (no /info/): check the server URL.{suffix}",
                kind="wrong_url",
                status=status,
                detail=detail,
            )
        if what.startswith("POST /infer") and "model" in low and status in (409, 500, 503) and (
            any(w in low for w in ("no ", "not trained", "not available", "yet", "cannot be loaded", "missing"))
        ):
            return ServerError(
                "No trained model on the server yet: mark some studies normal in Curate, then press "
                f"'Start training' in Retrain.{suffix}",
                kind="no_model",
                status=status,
                detail=detail,
            )
        if what.startswith("POST /train") and status == 409 and "weaker" in low:
            return ServerError(
                f"Training refused: its preset is weaker than the served model's.{suffix} To train and publish it "
                "anyway, check 'Allow a weaker preset' in Retrain (the served model stays in Model versions, "
                "for Roll back).",
                kind="refused",
                status=status,
                detail=detail,
            )
        if what.startswith("POST /model/rollback") and status in (404, 409):
            return ServerError(
                (f"That model version is no longer kept on the server: press Connect to refresh the list.{suffix}"
                 if status == 404 else f"Roll back refused (409).{suffix}"),
                kind="not_found" if status == 404 else "refused",
                status=status,
                detail=detail,
            )
        if status == 429 or (what.startswith("POST /train") and status in (400, 409, 422)):
            return ServerError(
                f"Training refused ({status}).{suffix} A training may already be running (press Stop first) or "
                "there are not enough studies marked normal.",
                kind="refused",
                status=status,
                detail=detail,
            )
        if status == 401:
            return ServerError(
                (f"Wrong user name or password.{suffix}" if what.startswith("POST /auth/token") else
                 f"The server at {self.url} asks you to sign in ({what}): enter your user name and password and "
                 f"press Sign in.{suffix}"),
                kind="auth",
                status=status,
                detail=detail,
            )
        if status == 403:
            return ServerError(
                f"Your account may not do this ({what}): ask an administrator for the role it needs.{suffix}",
                kind="forbidden",
                status=status,
                detail=detail,
            )
        if status == 404:
            return ServerError(f"Not found ({what}).{suffix}", kind="not_found", status=status, detail=detail)
        if 400 <= status < 500:
            return ServerError(
                f"The server rejected {what} ({status}).{suffix}", kind="bad_request", status=status, detail=detail
            )
        return ServerError(
            f"The server failed on {what} ({status}).{suffix} Check the server's log; if no model was trained "
            "yet, train one first.",
            kind="server",
            status=status,
            detail=detail,
        )

    def _json(self, method: str, path: str, query=None, payload: Any = None, timeout=None, what="") -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        ctype = None if payload is None else "application/json"
        _, _, data = self._request(method, path, query, body, ctype, timeout, what)
        if not data:
            return {}
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise ServerError(
                f"{self.url} answered {method} {path} with something that is not JSON: check the server URL.",
                kind="wrong_url",
            ) from None

    def _form(self, method: str, path: str, query=None, fields=None, files=None, timeout=None, what="") -> Any:
        body, ctype = encode_multipart(fields or {}, files or {})
        status, headers, data = self._request(method, path, query, body, ctype, timeout, what)
        return status, headers, data

    # ---------------------------------------------------------------------------------------------- info
    def info(self) -> Dict[str, Any]:
        """``GET /info/``: the app's name, version, models, strategies, trainers and train_stats."""
        info = self._json("GET", "/info/", what="GET /info/")
        if not isinstance(info, dict) or "models" not in info:
            raise ServerError(
                f"{self.url} answered /info/ but not like a MONAI Label app: check the server URL.", kind="wrong_url"
            )
        return info

    # ---------------------------------------------------------------------------------------------- detect
    def detect(
        self,
        image_id: Optional[str] = None,
        file_path: Optional[str] = None,
        model: str = DEFAULT_MODEL,
        params: Optional[Dict[str, Any]] = None,
        out_dir: Optional[str] = None,
        result_extension: str = ".nii.gz",
    ) -> DetectionResult:
        """``POST /infer/{model}``: score a datastore study (``image_id``) or an uploaded file (``file_path``).

        The float32 heatmap is written to ``out_dir`` (a new temporary folder by default).
        """
        if not image_id and not file_path:
            raise ValueError("detect needs image_id or file_path")
        p = dict(params or {})
        p.setdefault("result_extension", result_extension)
        files = {"file": file_path} if file_path else {}
        what = f"POST /infer/{model}"
        _, headers, data = self._form(
            "POST",
            f"/infer/{urllib.parse.quote(model)}",
            query={"image": image_id or ""},
            fields={"params": json.dumps(p)},
            files=files,
            timeout=self.long_timeout,
            what=what,
        )
        ctype = headers.get("content-type", "")
        result_params: Dict[str, Any] = {}
        heatmap_path = None
        if ctype.startswith("multipart/"):
            for part in decode_multipart(data, ctype):
                if part["filename"] or part["name"] in ("image", "file", "label"):
                    if not part["data"]:
                        continue
                    out_dir = out_dir or tempfile.mkdtemp(prefix="anomaly_")
                    os.makedirs(out_dir, exist_ok=True)
                    stem = (image_id or os.path.basename(file_path or "volume")).split(".")[0] or "volume"
                    heatmap_path = os.path.join(
                        out_dir, f"{stem}_anomaly{_result_suffix(part['filename'], p['result_extension'])}"
                    )
                    with open(heatmap_path, "wb") as f:
                        f.write(part["data"])
                elif part["name"] == "params":
                    result_params = json.loads(part["data"].decode("utf-8") or "{}")
        else:
            try:
                result_params = json.loads(data.decode("utf-8") or "{}")
            except ValueError:
                raise ServerError(f"{what} answered something that is neither JSON nor multipart.",
                                  kind="bad_response") from None
        if isinstance(result_params, str):  # some apps double-encode
            try:
                result_params = json.loads(result_params)
            except ValueError:
                result_params = {"message": result_params}
        if heatmap_path is None:
            raise ServerError(
                f"{what} returned no heatmap (only {sorted(result_params) if result_params else 'nothing'}). "
                "The model may not be trained yet: train one in Retrain, or check the server's log.",
                kind="no_model",
            )
        return DetectionResult(params=result_params, heatmap_path=heatmap_path, image_id=image_id)

    # ---------------------------------------------------------------------------------------------- datastore
    def upload_image(self, file_path: str, image_id: Optional[str] = None, params: Optional[dict] = None) -> str:
        """``PUT /datastore/image``: add a study; returns its datastore id."""
        _, _, data = self._form(
            "PUT",
            "/datastore/image",
            query={"image": image_id} if image_id else None,
            fields={"params": json.dumps(params or {})},
            files={"file": file_path},
            timeout=self.long_timeout,
            what="PUT /datastore/image",
        )
        try:
            return json.loads(data.decode("utf-8"))["image"]
        except (ValueError, KeyError, TypeError):
            raise ServerError("The server did not return the id of the uploaded study.", kind="bad_response") from None

    def download_image(self, image_id: str, out_dir: Optional[str] = None) -> str:
        """``GET /datastore/image?image=ID``: download a study's image file; returns the local path."""
        _, headers, data = self._request(
            "GET", "/datastore/image", {"image": image_id}, timeout=self.long_timeout,
            what=f"GET /datastore/image {image_id}",
        )
        filename = None
        for item in headers.get("content-disposition", "").split(";"):
            item = item.strip()
            if item.startswith("filename="):
                filename = item[9:].strip('"')
        out_dir = out_dir or tempfile.mkdtemp(prefix="anomaly_")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, image_id + _result_suffix(filename, ".nii.gz"))
        with open(path, "wb") as f:
            f.write(data)
        return path

    def image_info(self, image_id: str) -> Dict[str, Any]:
        """``GET /datastore/image/info?image=ID``."""
        return self._json("GET", "/datastore/image/info", {"image": image_id}, what="GET /datastore/image/info")

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        """``PUT /datastore/image/info?image=ID``: merge ``info`` into the study's info."""
        self._form(
            "PUT", "/datastore/image/info", {"image": image_id}, fields={"info": json.dumps(info)},
            what="PUT /datastore/image/info",
        )

    def set_curation(self, image_id: str, state: str) -> None:
        """Mark a study normal / abnormal / excluded (``info["curation"]``)."""
        if state not in CURATION_STATES:
            raise ValueError(f"curation state must be one of {CURATION_STATES}, not {state!r}")
        if not image_id:
            raise ServerError("This volume is not a study on the server yet: run 'Detect anomalies' on it first "
                              "(with 'Add to the server's studies' checked).", kind="bad_request")
        self.update_image_info(image_id, {CURATION_KEY: state})

    def datastore(self) -> Dict[str, Any]:
        """``GET /datastore/?output=all``: every study (``objects``) with its info."""
        return self._json("GET", "/datastore/", {"output": "all"}, what="GET /datastore/")

    def curation_states(self) -> Dict[str, str]:
        """Study id -> curation state (``unreviewed`` when not marked)."""
        objects = self.datastore().get("objects", {}) or {}
        states = {}
        for image_id, obj in objects.items():
            info = ((obj or {}).get("image") or {}).get("info") or {}
            state = info.get(CURATION_KEY)
            states[image_id] = state if state in CURATION_STATES else UNREVIEWED
        return states

    def curation_counts(self) -> Dict[str, int]:
        """Number of studies per curation state (normal, abnormal, excluded, unreviewed)."""
        counts = {s: 0 for s in CURATION_STATES + (UNREVIEWED,)}
        for state in self.curation_states().values():
            counts[state] += 1
        return counts

    # ---------------------------------------------------------------------------------------------- active learning
    def next_sample(self, strategy: str, params: Optional[dict] = None) -> Dict[str, Any]:
        """``POST /activelearning/{strategy}``: the strategy's answer, normalised.

        Returns ``{"id": str or None, "pending": int, "message": str}``: ``id`` is the next study to review (None
        when there is none to offer now); ``pending`` counts studies the server is still scoring in the background
        (the app answers at once from the studies already scored), and ``message`` says so in words.
        """
        res = self._json(
            "POST", f"/activelearning/{urllib.parse.quote(strategy)}", payload=params or {},
            timeout=self.long_timeout, what=f"POST /activelearning/{strategy}",
        )
        res = res if isinstance(res, dict) else {}
        try:
            pending = int(res.get("pending") or 0)
        except (TypeError, ValueError):
            pending = 0
        return {"id": str(res["id"]) if res.get("id") else None, "pending": pending,
                "message": str(res.get("message") or "")}

    # ---------------------------------------------------------------------------------------------- training
    def start_training(self, model: str = DEFAULT_MODEL, params: Optional[dict] = None) -> Dict[str, Any]:
        """``POST /train/{model}``: start training (on the studies marked normal); 429 -> ServerError('refused')."""
        return self._json(
            "POST", f"/train/{urllib.parse.quote(model)}", payload=params or {}, what=f"POST /train/{model}"
        )

    def training_status(self) -> Optional[Dict[str, Any]]:
        """``GET /train/``: the last training task ``{id, status, details...}``, or None when there was none."""
        try:
            return self._json("GET", "/train/", what="GET /train/")
        except ServerError as e:
            if e.status == 404:
                return None
            raise

    def is_training(self) -> bool:
        """True while a training task is submitted or runs (``GET /train/?check_if_running=true``)."""
        try:
            res = self._json("GET", "/train/", {"check_if_running": "true"}, what="GET /train/")
        except ServerError as e:
            if e.status == 404:
                return False
            raise
        return bool(res) and str(res.get("status", "RUNNING")).upper() in ACTIVE_TRAIN_STATES

    def stop_training(self) -> Dict[str, Any]:
        """``DELETE /train/``: stop the running training (the app may wait for a graceful stop, hence the long
        timeout)."""
        return self._json("DELETE", "/train/", timeout=max(self.timeout, 90.0), what="DELETE /train/")

    # ---------------------------------------------------------------------------------------------- model versions
    def list_versions(self) -> Dict[str, Any]:
        """``GET /model/versions``: ``{"current": version served, "keep_versions": N, "versions": [{"version",
        "preset", "created", "published", "training": {...}, "calibration": {...}, "current": bool}, ...]}``,
        newest first. A server without version history -> ServerError (``not_found`` or ``bad_response``)."""
        res = self._json("GET", "/model/versions", what="GET /model/versions")
        if not isinstance(res, dict) or not isinstance(res.get("versions"), list):
            raise ServerError("The server keeps no model versions (no version list in GET /model/versions): it may "
                              "be an older app.", kind="bad_response")
        return res

    def rollback(self, version: str) -> Dict[str, Any]:
        """``POST /model/rollback?version=V``: serve a kept version again; answers ``{"version", "previous_version",
        "served"}`` once the server has loaded it (hence the longer timeout)."""
        if not version:
            raise ValueError("rollback needs a model version")
        return self._json("POST", "/model/rollback", {"version": version}, timeout=max(self.timeout, 120.0),
                          what=f"POST /model/rollback {version}")


def normalize_url(url: str) -> str:
    """``localhost:8000`` -> ``http://localhost:8000``; no trailing slash."""
    url = (url or "").strip()
    if not url:
        url = DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


# ----------------------------------------------------------------------------------------------------------------
# reading /info/
# ----------------------------------------------------------------------------------------------------------------
#: Values of an infer task's declared output (``output`` / ``result`` in its ``/info/`` entry) that mean "a float
#: heatmap"; any other declared value (``label``, ``segmentation`` ...) means the task is not an anomaly method.
HEATMAP_OUTPUTS = ("heatmap",)


def is_heatmap_method(entry: Any) -> bool:
    """Does an infer task of ``GET /info/`` (``info["models"][name]``) return a float heatmap, i.e. is it an anomaly
    *method* the module can run?

    1. If the entry declares its output (``"output"`` or ``"result"``, a string), that decides: ``heatmap``
       (see :data:`HEATMAP_OUTPUTS`) -> yes, anything else -> no.
    2. Otherwise MONAI Label's own fields decide: type ``others`` (MONAI Label's type for results that are not label
       maps; a missing type counts as ``others``) **and** no labels -> yes. A ``segmentation`` (``spmamba_seg``),
       ``deepgrow``, ``deepedit``, ``scribbles``, ``classification``, ``detection`` or ``annotation`` task, or any
       task that names labels, returns a label map (or no image) -> no.
    """
    if not isinstance(entry, dict):
        return False
    for key in ("output", "result"):
        declared = entry.get(key)
        if isinstance(declared, str) and declared.strip():
            return declared.strip().lower() in HEATMAP_OUTPUTS
    kind = str(entry.get("type") or "others").strip().lower()
    kind = kind.rsplit(".", 1)[-1]  # "InferType.OTHERS" (an enum's str()) -> "others"
    return kind == "others" and not entry.get("labels")


@dataclass
class ServerSummary:
    """What the Connect button shows, read from ``GET /info/``.

    ``models`` lists the anomaly *methods*: the infer tasks that return a float heatmap (:func:`is_heatmap_method`),
    in the server's order; ``methods`` holds their ``/info/`` entries (description, version ...).
    """

    name: str = ""
    version: str = ""
    models: List[str] = field(default_factory=list)
    model_versions: Dict[str, str] = field(default_factory=dict)
    strategies: List[str] = field(default_factory=list)
    trainers: List[str] = field(default_factory=list)
    train_stats: Dict[str, Any] = field(default_factory=dict)
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    studies: Dict[str, Any] = field(default_factory=dict)  # spmamba.studies: kind local|dicomweb, url, pacs state

    @property
    def pacs(self) -> bool:
        """Whether the server's studies are the image series of a PACS (ids = SeriesInstanceUIDs)."""
        return self.studies.get("kind") == "dicomweb"

    def model_version(self, model: str) -> str:
        return self.model_versions.get(model, "")

    def description(self, method: str) -> str:
        entry = self.methods.get(method) or {}
        return str(entry.get("description") or "")

    def train_task(self, method: str) -> str:
        """The trainer that trains ``method``: the trainer of the same name, else ``spmamba`` (the app's anomaly
        trainer), else the server's first trainer; ``method`` itself when the server lists no trainers."""
        if method in self.trainers or not self.trainers:
            return method
        return DEFAULT_MODEL if DEFAULT_MODEL in self.trainers else self.trainers[0]


def summarize_info(info: Dict[str, Any]) -> ServerSummary:
    """Extract the anomaly methods (infer tasks that return a heatmap, see :func:`is_heatmap_method`) with their
    version, strategies, trainers and train stats.

    The model version is read from the model's own entry (``version`` / ``model_version``), else from the app's
    extra section (``info["spmamba"]["model"]["version"]``, what the SP-Mamba app publishes), else from the last
    training's stats (``train_stats[model]["model_version"]``).
    """
    models = info.get("models") or {}
    names = [m for m, v in models.items() if is_heatmap_method(v)]
    app_model = ((info.get("spmamba") or {}).get("model") or {}) if isinstance(info.get("spmamba"), dict) else {}
    app_version = app_model.get("version") if isinstance(app_model, dict) else None
    train_stats = info.get("train_stats") or {}
    versions: Dict[str, str] = {}
    for name in names:
        m = models.get(name) if isinstance(models.get(name), dict) else {}
        v = m.get("model_version") or m.get("version") or app_version
        if not v and isinstance(train_stats.get(name), dict):
            v = train_stats[name].get("model_version")
        versions[name] = "" if v in (None, "") else str(v)
    strategies = info.get("strategies") or {}
    trainers = info.get("trainers") or {}
    return ServerSummary(
        name=str(info.get("name", "")),
        version=str(info.get("version", "")),
        models=names,
        model_versions=versions,
        strategies=list(strategies),
        trainers=list(trainers),
        train_stats=train_stats,
        methods={name: dict(models[name]) for name in names},
        studies=dict(((info.get("spmamba") or {}).get("studies") or {}) if isinstance(info.get("spmamba"), dict)
                     else {}),
    )


def describe_version(entry: Dict[str, Any]) -> str:
    """One line for a kept model version: ``3f2a9c1d4e5f  fast  2025-01-05 12:00  3 epochs, 120 steps, 16 studies,
    stopped early  (served)``."""
    bits = [str(entry.get("version") or "?"), str(entry.get("preset") or "custom")]
    when = str(entry.get("created") or entry.get("published") or "")
    if when:
        bits.append(when[:16].replace("T", " "))
    t = entry.get("training") if isinstance(entry.get("training"), dict) else {}
    summary = []
    for key, word in (("epochs", "epochs"), ("steps", "steps"), ("n_studies", "studies")):
        if isinstance(t.get(key), (int, float)) and not isinstance(t.get(key), bool):
            summary.append(f"{int(t[key])} {word}")
    if t.get("stopped_early"):
        summary.append("stopped early")
    if summary:
        bits.append(", ".join(summary))
    line = "  ".join(bits)
    return line + "  (served)" if entry.get("current") else line


def train_progress(train_stats: Dict[str, Any], model: str = DEFAULT_MODEL) -> Tuple[Optional[int], str]:
    """Percent done (0-100, or None when unknown) and a one-line text from ``/info/`` train_stats.

    MONAI Label puts the trainer's stats under ``train_stats[model]`` (``epoch``, ``total_epochs``, ``best_metric``
    ...); older servers put them at the top level.
    """
    stats = train_stats.get(model) if isinstance(train_stats.get(model), dict) else train_stats
    if not isinstance(stats, dict) or not stats:
        return None, "no training statistics yet"
    epoch, total = stats.get("epoch"), stats.get("total_epochs")
    percent = None
    if isinstance(epoch, (int, float)) and isinstance(total, (int, float)) and total > 0:
        percent = int(max(0, min(100, round(100.0 * epoch / total))))
    bits = []
    if epoch is not None and total:
        bits.append(f"epoch {epoch}/{total}")
    for key in ("loss", "train_loss", "best_metric", "val_score"):
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bits.append(f"{key} {v:.4g}")
    for key in ("phase", "status"):
        if stats.get(key):
            bits.append(str(stats[key]))
    return percent, ", ".join(bits) if bits else "training"
