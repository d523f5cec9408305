"""HTTP errors the app raises: every bad request ends as a 4xx JSON ``{"detail": "..."}`` naming the problem.

MONAI Label 0.8.5 registers no exception handler of its own (its exceptions become 500s), so the app raises
FastAPI's ``HTTPException`` directly; FastAPI turns it into the response wherever in the request it is raised.
"""
from __future__ import annotations

import re

from fastapi import HTTPException

# Image ids double as file names in the local datastore: keep them to a safe, portable alphabet.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def bad_request(msg: str) -> HTTPException:
    return HTTPException(status_code=400, detail=msg)


def not_found(msg: str) -> HTTPException:
    return HTTPException(status_code=404, detail=msg)


def conflict(msg: str) -> HTTPException:
    return HTTPException(status_code=409, detail=msg)


def unsupported(msg: str) -> HTTPException:
    return HTTPException(status_code=415, detail=msg)


def unprocessable(msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=msg)


def check_id(value: str, what: str = "image id") -> str:
    """Return ``value`` if it is a safe datastore id, else raise a 400 that says why."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"missing {what}")
    if "/" in value or "\\" in value or ".." in value or "\x00" in value:
        raise bad_request(f"invalid {what} {value!r}: path separators and '..' are not allowed")
    if not _SAFE_ID.match(value):
        raise bad_request(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


NO_MODEL_MSG = (
    "No {name} model is available yet: train one first (mark normal studies with "
    "PUT /datastore/image/info?image=ID info={{\"curation\": \"normal\"}}, then POST /train/{method}), "
    "or start the server with --conf model PATH pointing to a checkpoint made by `spmamba train`. ({where})"
)
#: how messages and task descriptions name the built-in methods (others by their registry name)
METHOD_NAMES = {"spmamba": "SP-Mamba", "voxelwise": "voxel-wise statistics", "memmc_mae": "MemMC-MAE",
                "spatial_msma": "Spatial-MSMA"}


def method_title(method: str) -> str:
    """The name messages give a method of the registry: "SP-Mamba" for spmamba, the registry name for others."""
    return METHOD_NAMES.get(method, method)
