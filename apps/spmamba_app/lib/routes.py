"""MONAI Label endpoints re-registered in front of the stock ones (same paths, same parameters), and the app's own.

MONAI Label 0.8.5 offers no hook to validate a request before it spends work on it, so at server start-up
(``on_init_complete``, which only runs in the server process) the app puts these routes ahead of the stock ones:

* ``POST /infer/{model}``: a plain ``def`` so FastAPI runs it in its thread pool: parallel requests run side by side
  and ``/info/`` keeps answering while a volume is processed (the stock ``async def`` blocks the event loop).
  Before delegating to the stock ``run_inference`` it rejects unknown models, bad ``params`` JSON, path-like or
  unknown image ids (404/400) instead of letting them reach the file system.
* ``POST /train/{model}``: checks there are enough studies marked normal and answers 409 with what to do if not,
  instead of starting a subprocess that would fail; then delegates to the stock ``run_model``.
* ``DELETE /train/``: asks a running training to stop gracefully (it finishes the current step, calibrates and
  publishes what it has): it waits ``stop_grace_s`` for the training to leave its step, and while it calibrates and
  publishes (``train_stats`` phase) up to ``stop_max_s`` in all, then falls back to the stock kill. The stop request
  file is removed either way; the answer says which happened and names the published version.

* ``PUT /datastore/image`` and ``PUT /datastore/image/info``: malformed ``params`` / ``info`` JSON and path-like ids
  are a 400 (the stock handlers answer 500); the files themselves are validated by the app's datastore.
* ``POST /activelearning/{strategy}``, ``POST /scoring/{method}`` and ``GET /info/``: the same calls as plain
  ``def``s (the stock ones are ``async def`` and would hold the event loop, and with it every other request, while
  they load a model or score); an active-learning answer may carry ``pending`` without an ``id`` (studies still
  being scored in the background), which the stock handler cannot pass on.

Who may call what (with sign-in on, lib/auth.py): detection, info, model versions and active learning need the
``user`` role; curation, uploads and scoring ``annotator``; training, stopping it and rollback ``reviewer`` (a role
includes those below it). ``POST /auth/token`` (sign in) answers 401 for wrong credentials instead of a 500.

Two routes are the app's own (no stock equivalent): ``GET /model/versions`` (the served model and the versions kept
for rollback; any user) and ``POST /model/rollback?version=V`` (reviewer, like training: 404 for a version not kept,
409 while a training runs). They are registered before MONAI Label's ``/model/{model}`` download route.

The stock handlers do the rest, so the REST surface is unchanged for stock clients. The endpoints are plain
module-level functions; :func:`install` only puts them in front of the stock routes.
"""


import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints import datastore as ep_datastore
from monailabel.endpoints import infer as ep_infer
from monailabel.endpoints import info as ep_info
from monailabel.endpoints import scoring as ep_scoring
from monailabel.endpoints import train as ep_train
from monailabel.endpoints.user.auth import User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.utils import processes, tasks

from . import auth
from .datastore import require_volume_name
from .errors import bad_request, check_id, not_found

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "spmamba_"
# train_stats phases of a training that has left its optimisation loop (it saw the stop request, or was finishing)
FINISHING_PHASES = ("position_stats", "calibrate", "done", "publishing", "stopped")


def upload_suffix(filename) -> str:
    """The upload's extension(s) (``.nii.gz``), reduced to a safe alphabet; ``.nii.gz`` when there is none."""
    suffix = "".join(pathlib.Path(os.path.basename(filename or "")).suffixes[-2:]).lower()
    suffix = re.sub(r"[^a-z0-9.]", "", suffix)
    return suffix or ".nii.gz"


def task_running(kind: str) -> bool:
    """Whether a MONAI Label task of ``kind`` (``train``, ``scoring``) runs or is submitted and not yet started."""
    return bool(processes(kind)) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks(kind))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def spmamba_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ep_infer.ResultType] = None,
    user: User = Depends(auth.user_role()),
):
    instance = app_instance()
    if model not in instance._infers:
        raise not_found(f"no inference model {model!r}; available: {', '.join(sorted(instance._infers))}")
    try:
        p = json.loads(params) if params else {}
    except ValueError as e:
        raise bad_request(f"params is not valid JSON: {e}") from e
    if not isinstance(p, dict):
        raise bad_request("params must be a JSON object")
    for key in ("image", "model"):
        if key in p:
            raise bad_request(f"params may not set {key!r}: use the URL (?image=ID) or upload a file")
    if file:
        if file.filename:
            require_volume_name(file.filename)  # 415 naming the client's file, as PUT /datastore/image
        # keep the upload ourselves so error messages can name the client's file, not a temporary one
        suffix = upload_suffix(file.filename)
        fd, tmp = tempfile.mkstemp(prefix="tmp_upload_", suffix=suffix)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
        background_tasks.add_task(_remove, tmp)
        p["upload_name"] = os.path.basename(file.filename or "upload" + suffix)
        image, file = tmp, None
    elif not session_id:
        if not image:
            raise bad_request("no input: give ?image=ID of a datastore study or upload a file")
        instance.datastore().require_image(image)  # 400 / 404 / 422 (a PACS series that is not an image)
    return ep_infer.run_inference(background_tasks, model, image, session_id, json.dumps(p), file, label, output)


def spmamba_train(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = Depends(auth.reviewer_role()),
):
    instance = app_instance()
    task = instance._trainers.get(model)
    if task is None:
        raise not_found(f"no training task {model!r}; available: {', '.join(sorted(instance._trainers))}")
    if task_running("train") and not enqueue:  # the stock check misses a task submitted but not yet started
        raise HTTPException(status_code=429, detail="a training is already running (DELETE /train/ stops it)")
    task.precheck({"model": model, **(params or {})}, instance.datastore())
    warning = task.preset_warning({"model": model, **(params or {})})
    res = ep_train.run_model(model, params, run_sync, enqueue)
    if warning and isinstance(res, dict):
        res = {**res, "warning": warning}  # forced: the weaker model will replace the served one
    return res


def _clear_stop_request(s) -> None:
    if os.path.exists(s.stop_path):
        _remove(s.stop_path)


def spmamba_train_stop(user: User = Depends(auth.reviewer_role())):
    instance = app_instance()
    s = instance.settings
    running = dict(processes("train"))
    if not running or s.stop_grace_s <= 0:
        res = ep_train.stop()
        _clear_stop_request(s)
        return res
    task_id = next(iter(running))
    trainer = instance._trainers.get(s.method)

    def stats() -> dict:
        return trainer.stats()

    t0 = time.time()
    with open(s.stop_path, "w") as f:
        f.write(str(t0))
    hard = t0 + max(s.stop_max_s, s.stop_grace_s)
    finishing = False  # the training left its optimisation loop: calibrating or publishing what it has
    while task_id in processes("train"):
        now = time.time()
        finishing = finishing or stats().get("phase") in FINISHING_PHASES
        if now >= hard or (not finishing and now >= t0 + s.stop_grace_s):
            break
        time.sleep(0.2)
    waited = round(time.time() - t0, 1)
    if task_id not in processes("train"):
        st = stats()
        _clear_stop_request(s)
        task = next((t for t in tasks("train") if t["id"] == task_id), None)
        if task is None:
            return {"id": task_id, "status": "STOPPED"}
        task["status"] = "STOPPED"
        if st.get("status") == "DONE":
            task["model_version"] = st.get("model_version")
            task["calibration_volumes"] = st.get("calibration_volumes")
            task["stopped"] = (
                f"graceful after {waited} s: the model trained so far was calibrated (on "
                f"{st.get('calibration_volumes')} of {st.get('held_out_volumes')} held-out volumes) and published "
                f"as version {st.get('model_version')}"
            )
        else:
            task["stopped"] = f"graceful after {waited} s: {st.get('detail') or 'nothing was published'}"
        logger.info(f"Training {task_id} stopped: {task['stopped']}")
        return task
    res = ep_train.stop()
    _clear_stop_request(s)
    why = (f"did not finish calibrating and publishing within stop_max_s ({s.stop_max_s} s)" if finishing
           else f"did not end its training step within stop_grace_s ({s.stop_grace_s} s)")
    if isinstance(res, dict):
        res["stopped"] = f"killed after {waited} s: the training {why}; the served model is unchanged"
    logger.warning(f"Training {task_id} killed after {waited} s: it {why}")
    return res


def _json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError as e:
        raise bad_request(f"{field} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object")
    return value


def spmamba_add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(auth.annotator_role()),
):
    _json_object(params, "params")
    if image is not None:
        check_id(image)
    if file is not None and file.filename:
        require_volume_name(file.filename)  # the stock handler would hand the datastore a temporary name
    return ep_datastore.add_image(background_tasks, image, params, file, user.username)


def spmamba_put_image_info(
    image: str,
    info: str = Form("{}"),
    user: User = Depends(auth.annotator_role()),
):
    _json_object(info, "info")
    check_id(image)
    return ep_datastore.update_image_info(image, info, user.username)


def spmamba_model_versions(user: User = Depends(auth.user_role())):
    return app_instance().model_versions()


def spmamba_model_rollback(version: str, user: User = Depends(auth.reviewer_role())):
    instance = app_instance()
    check_id(version, "model version")
    if task_running("train"):
        raise HTTPException(status_code=409, detail="a training is running and will publish a new model: "
                                                    "stop it (DELETE /train/) or wait, then roll back")
    return instance.rollback_model(version)


def spmamba_info(user: User = Depends(auth.user_role())):
    return ep_info.app_info()


def spmamba_activelearning(
    strategy: str,
    params: Optional[dict] = None,
    user: User = Depends(auth.user_role()),
):
    instance = app_instance()
    params = params if params is not None else {}
    result = instance.next_sample({**params, "strategy": strategy})  # 404 unknown; never scores here
    if not result or not result.get("id"):
        return result or {}
    image_id = result["id"]
    ds = instance.datastore()
    image_info = ds.get_image_info(image_id)
    strategy_info = dict(image_info.get("strategy") or {})  # as the stock handler: who was sent what, when
    strategy_info[strategy] = {"ts": int(time.time()), "client_id": params.get("client_id", user.username)}
    try:
        ds.update_image_info(image_id, {"strategy": strategy_info})
    except Exception:  # noqa: BLE001
        logger.warning(f"Failed to update image info for {image_id}")
    result.update(image_info)
    return result


def spmamba_scoring(
    method: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(auth.annotator_role()),
):
    instance = app_instance()
    if method not in instance._scoring_methods:
        raise not_found(f"no scoring method {method!r}; available: {', '.join(sorted(instance._scoring_methods))}")
    return ep_scoring.run_method(method, params, run_sync)


def spmamba_login(username: str = Form(...), password: str = Form(...)):
    return auth.login(username, password)


#: (path under MONAI Label's API prefix, endpoint, methods, summary), put in front of the stock routes in this order
ROUTES = [
    ("/infer/{model}", spmamba_infer, ["POST"], "Run inference (validated, runs in the thread pool)"),
    ("/train/{model}", spmamba_train, ["POST"], "Run training (checks the curated normals first)"),
    ("/train/", spmamba_train_stop, ["DELETE"], "Stop training (graceful, then kill)"),
    ("/datastore/image", spmamba_add_image, ["PUT"], "Upload a new image (validated before it is stored)"),
    ("/datastore/image/info", spmamba_put_image_info, ["PUT"], "Update image info (curation state)"),
    ("/model/versions", spmamba_model_versions, ["GET"], "Served model and the kept versions"),
    ("/model/rollback", spmamba_model_rollback, ["POST"], "Serve a kept model version again"),
    ("/info/", spmamba_info, ["GET"], "App info (thread pool: answers while others work)"),
    ("/activelearning/{strategy}", spmamba_activelearning, ["POST"], "Next study to review (never waits for scoring)"),
    ("/scoring/{method}", spmamba_scoring, ["POST"], "Score every study (background unless run_sync)"),
    ("/auth/token", spmamba_login, ["POST"], "Sign in (password grant at the OIDC issuer; 401 for wrong credentials)"),
]


def install(fastapi_app) -> None:
    """Put :data:`ROUTES` in front of MONAI Label's stock routes (replacing any installed before)."""
    api = settings.MONAI_LABEL_API_STR
    router = fastapi_app.router
    router.routes[:] = [r for r in router.routes if not getattr(r, "name", "").startswith(ROUTE_PREFIX)]
    for path, endpoint, methods, summary in ROUTES:
        router.add_api_route(api + path, endpoint, methods=methods, name=endpoint.__name__, summary=summary)
        router.routes.insert(0, router.routes.pop())
    auth.install(fastapi_app)  # MONAI Label's token check, fixed, for the stock routes too
    fastapi_app.openapi_schema = None
    logger.info("SP-Mamba app: validating routes installed for /infer/{model}, /train/{model}, DELETE /train/")
