"""Sign-in: MONAI Label's own OIDC authentication (Keycloak-style), made to accept valid tokens, with roles.

MONAI Label 0.8.5 turns auth on with ``MONAI_LABEL_AUTH_ENABLE=true`` and ``MONAI_LABEL_AUTH_REALM_URI`` (the OIDC
issuer, e.g. a Keycloak realm), but its ``from_token`` calls ``jwt.decode`` without ``algorithms``, which PyJWT 2
refuses, so every token, valid or not, gets a 401. At start-up (:func:`install`, in the server process) the app
replaces MONAI Label's ``get_current_user`` dependency (FastAPI ``dependency_overrides``, so the stock routes and the
app's own both use it; nothing in site-packages is changed) with :func:`current_user`, which

* reads the issuer's discovery document (``REALM/.well-known/openid-configuration``) and verifies the bearer token's
  signature against the issuer's published keys (``jwks_uri``, PyJWT's ``PyJWKClient``; asymmetric algorithms only,
  never ``none`` or a shared secret), its expiry and its issuer; the audience is not checked (Keycloak's access
  tokens name ``account``), as in MONAI Label;
* takes the user name, e-mail, name and roles from the claims MONAI Label's settings name
  (``preferred_username``, ``email``, ``name``, ``realm_access#roles``);
* answers 401 with what to do for a missing, malformed, expired or foreign token, and 503 when the issuer cannot be
  reached.

Roles (MONAI Label's names, ``MONAI_LABEL_AUTH_ROLE_*``): a role includes the ones below it,
admin > reviewer > annotator > user. Detection, listing, downloads and active learning need ``user``; curation,
uploads and scoring ``annotator``; training, stopping it and rolling back a model ``reviewer`` (so reviewers and
admins train). A token without the role gets a 403 that names the role needed.

``POST /auth/token`` (MONAI Label's password login, which clients use to sign in) is replaced too: a wrong user name
or password is a 401 (the stock route answers 500), an unreachable issuer a 503.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional

import jwt
import requests
from fastapi import Depends, Form, HTTPException, status
from fastapi.security import OAuth2PasswordBearer
from starlette.concurrency import run_in_threadpool
from monailabel.config import settings
from monailabel.endpoints.user.auth import DEFAULT_USER, User

logger = logging.getLogger(__name__)

#: asymmetric signature algorithms accepted (an issuer's keys are public: a symmetric or 'none' token is refused)
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
DISCOVERY_TTL_S = 300.0

_bearer = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)
_lock = threading.Lock()
_discovery: Dict[str, Any] = {}  # realm -> (time, document)
_jwks: Dict[str, jwt.PyJWKClient] = {}


def enabled() -> bool:
    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


def role_names() -> List[str]:
    """MONAI Label's role names, lowest first: user, annotator, reviewer, admin."""
    return [settings.MONAI_LABEL_AUTH_ROLE_USER, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
            settings.MONAI_LABEL_AUTH_ROLE_REVIEWER, settings.MONAI_LABEL_AUTH_ROLE_ADMIN]


def effective_roles(roles: List[str]) -> List[str]:
    """``roles`` plus every role below the highest of them (admin > reviewer > annotator > user)."""
    order = role_names()
    ranks = [order.index(r) for r in roles if r in order]
    implied = order[: max(ranks) + 1] if ranks else []
    return sorted(set(roles) | set(implied))


def unauthorized(msg: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail=msg, headers={"WWW-Authenticate": "Bearer"})


def unavailable(msg: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=msg)


def discovery(realm: Optional[str] = None) -> Dict[str, Any]:
    """The issuer's OpenID configuration (cached for a few minutes); 503 when it cannot be read."""
    realm = (realm or settings.MONAI_LABEL_AUTH_REALM_URI).rstrip("/")
    with _lock:
        cached = _discovery.get(realm)
        if cached and time.monotonic() - cached[0] < DISCOVERY_TTL_S:
            return cached[1]
    url = f"{realm}/.well-known/openid-configuration"
    try:
        r = requests.get(url, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        r.raise_for_status()
        doc = r.json()
    except (requests.RequestException, ValueError) as e:
        raise unavailable(f"the sign-in service at {realm} cannot be reached ({type(e).__name__}); try again or ask "
                          "the administrator") from e
    if not isinstance(doc, dict) or "jwks_uri" not in doc:
        raise unavailable(f"{url} is not an OpenID Connect discovery document (no jwks_uri)")
    with _lock:
        _discovery[realm] = (time.monotonic(), doc)
    return doc


def _claim(payload: Dict[str, Any], path: str) -> Any:
    value: Any = payload
    for part in path.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def verify(token: str) -> User:
    """The user a bearer token names, after checking its signature, expiry and issuer; raises 401/503."""
    doc = discovery()
    jwks_uri = doc["jwks_uri"]
    with _lock:
        client = _jwks.get(jwks_uri)
        if client is None:
            client = _jwks[jwks_uri] = jwt.PyJWKClient(jwks_uri, cache_keys=True,
                                                      timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
    try:
        key = client.get_signing_key_from_jwt(token)
    except jwt.PyJWKClientConnectionError as e:
        raise unavailable(f"the sign-in service's keys ({jwks_uri}) cannot be read; try again") from e
    except (jwt.PyJWKClientError, jwt.InvalidTokenError) as e:
        raise unauthorized(f"the token is not one of this server's sign-in service ({e}): sign in again") from e
    try:
        payload = jwt.decode(token, key.key, algorithms=ALGORITHMS, issuer=doc.get("issuer"),
                             options={"verify_aud": False, "require": ["exp"]})
    except jwt.ExpiredSignatureError as e:
        raise unauthorized("the token has expired: sign in again") from e
    except jwt.InvalidIssuerError as e:
        raise unauthorized("the token was issued by another sign-in service: sign in to this server") from e
    except jwt.InvalidTokenError as e:
        raise unauthorized(f"invalid token ({e}): sign in again") from e
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES) or []
    roles = [str(r) for r in roles] if isinstance(roles, list) else []
    return User(username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub") or "?"),
                email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=effective_roles(roles))


async def current_user(token: Optional[str] = Depends(_bearer)) -> User:
    """Replaces MONAI Label's ``get_current_user``: everyone is its default admin user while auth is off (answered
    on the event loop, as MONAI Label's). The check itself runs in the thread pool: reading the issuer's keys never
    holds the event loop."""
    if not enabled():
        return DEFAULT_USER
    if not token:
        raise unauthorized("sign in first: this server needs a bearer token (POST /auth/token with your user name "
                           "and password, or sign in from the Slicer module / `spmamba login`)")
    return await run_in_threadpool(verify, token)


class Require:
    """A route dependency: the signed-in user, who must hold ``role`` (or a higher one); 403 naming it if not."""

    def __init__(self, role: str):
        self.role = role

    async def __call__(self, user: User = Depends(current_user)) -> User:
        if not enabled():
            return user
        if self.role not in user.roles:
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN,
                                detail=f"{user.username} may not do this: it needs the role {self.role!r} (or a "
                                       f"higher one); the token's roles: {', '.join(user.roles) or 'none'}")
        return user


def user_role() -> Require:
    return Require(settings.MONAI_LABEL_AUTH_ROLE_USER)


def annotator_role() -> Require:
    return Require(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)


def reviewer_role() -> Require:
    return Require(settings.MONAI_LABEL_AUTH_ROLE_REVIEWER)


def login(username: str = Form(...), password: str = Form(...)) -> Dict[str, Any]:
    """``POST /auth/token``: the issuer's password grant for ``MONAI_LABEL_AUTH_CLIENT_ID`` (MONAI Label's login);
    401 for wrong credentials, 503 when the issuer cannot be reached; ``{"access_token": null}`` while auth is
    off."""
    if not enabled():
        return {"access_token": None, "token_type": None}
    endpoint = discovery().get("token_endpoint")
    if not endpoint:
        raise unavailable("the sign-in service publishes no token endpoint")
    try:
        r = requests.post(endpoint, data={"client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": username,
                                          "password": password, "grant_type": "password"},
                          timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
    except requests.RequestException as e:
        raise unavailable(f"the sign-in service cannot be reached ({type(e).__name__}); try again") from e
    if r.status_code in (400, 401, 403):
        raise unauthorized("wrong user name or password")
    if r.status_code != 200:
        raise unavailable(f"the sign-in service failed ({r.status_code})")
    return r.json()


def install(fastapi_app) -> None:
    """Make MONAI Label's auth dependency (used by every stock route) this module's :func:`current_user`."""
    from monailabel.endpoints.user.auth import get_current_user

    fastapi_app.dependency_overrides[get_current_user] = current_user
    if enabled():
        logger.info(f"Sign-in enabled: tokens of {settings.MONAI_LABEL_AUTH_REALM_URI} (roles "
                    f"{' < '.join(role_names())})")
