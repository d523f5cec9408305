"""Signing in to an SP-Mamba app server that has sign-in on (``spmamba login``, ``spmamba serve``'s ready report).

The server (MONAI Label's ``POST /auth/token``) exchanges a user name and password for a short-lived bearer token
at its OpenID Connect issuer. What is remembered, per server URL:

* the URL and the user name, in ``$XDG_CONFIG_HOME/spmamba/client.json`` (default ``~/.config``; written atomically,
  readable by the user only);
* the password only in the system keyring (the ``keyring`` package: the desktop's secret service, macOS Keychain,
  Windows Credential Locker) under the service ``spmamba:<URL>``; where no keyring is usable it is not stored at all
  and the next command asks again. It is never written to a file.

Standard library + keyring only (no MONAI Label, no torch).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Tuple

from spmamba.atomic import write_text

__all__ = ["SignInError", "config_path", "sign_in", "remembered", "remember", "forget", "token_for",
           "auth_enabled", "keyring_available"]


class SignInError(Exception):
    """Signing in failed; the message says why and what to do."""


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "spmamba" / "client.json"


def _normal(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _load() -> dict:
    try:
        return json.loads(config_path().read_text())
    except (OSError, ValueError):
        return {}


def _keyring():
    """The keyring module when a usable backend is there (not the 'fail' or 'null' one), else None."""
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - no keyring package, or its set-up failed
        return None
    if isinstance(backend, fail.Keyring) or "null" in type(backend).__module__.lower():
        return None
    return keyring


def keyring_available() -> bool:
    return _keyring() is not None


def _service(url: str) -> str:
    return f"spmamba:{_normal(url)}"


def remember(url: str, user: str, password: Optional[str] = None) -> bool:
    """Remember ``url`` and ``user`` (file) and ``password`` (keyring only). Returns whether the password was
    stored."""
    url = _normal(url)
    cfg = _load()
    cfg.setdefault("servers", {})[url] = {"user": user}
    cfg["last"] = url
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(cfg, indent=2))
    os.chmod(path, 0o600)
    if password is None:
        return False
    kr = _keyring()
    if kr is None:
        return False
    try:
        kr.set_password(_service(url), user, password)
    except Exception:  # noqa: BLE001 - a locked or failing keyring: do not store
        return False
    return True


def remembered(url: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(URL, user name) remembered for ``url`` (default: the last one signed in to), or (url, None)."""
    cfg = _load()
    url = _normal(url) if url else cfg.get("last")
    if not url:
        return None, None
    return url, (cfg.get("servers", {}).get(url) or {}).get("user")


def forget(url: str) -> None:
    """Forget ``url``'s user name and its password in the keyring."""
    url = _normal(url)
    cfg = _load()
    entry = cfg.get("servers", {}).pop(url, None)
    if cfg.get("last") == url:
        cfg.pop("last")
    if config_path().exists():
        write_text(config_path(), json.dumps(cfg, indent=2))
    kr = _keyring()
    if kr is not None and entry and entry.get("user"):
        try:
            kr.delete_password(_service(url), entry["user"])
        except Exception:  # noqa: BLE001 - nothing stored
            pass


def auth_enabled(url: str, timeout: float = 10.0) -> bool:
    """Whether the server at ``url`` asks for sign-in (MONAI Label's ``GET /auth/``)."""
    try:
        with urllib.request.urlopen(_normal(url) + "/auth/", timeout=timeout) as r:
            return bool(json.loads(r.read().decode()).get("enabled"))
    except (OSError, ValueError) as e:
        raise SignInError(f"cannot reach {url} ({e}): is the server running?") from e


def sign_in(url: str, user: str, password: str, timeout: float = 30.0) -> str:
    """A bearer token for ``user`` from the server at ``url`` (``POST /auth/token``)."""
    body = urllib.parse.urlencode({"username": user, "password": password}).encode()
    req = urllib.request.Request(_normal(url) + "/auth/token", data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            token = json.loads(r.read().decode()).get("access_token")
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = json.loads(e.read().decode()).get("detail", "")
        except (OSError, ValueError, AttributeError):
            pass
        if e.code == 401:
            raise SignInError(f"{url}: {detail or 'wrong user name or password'}") from None
        raise SignInError(f"{url}: sign-in failed ({e.code}{': ' + detail if detail else ''})") from None
    except (OSError, ValueError) as e:
        raise SignInError(f"cannot reach {url} ({e}): is the server running?") from e
    if not token:
        raise SignInError(f"{url} has sign-in off: no token needed")
    return str(token)


def token_for(url: str) -> Optional[str]:
    """A fresh token for ``url`` from the remembered user and the keyring's password, or None when there is no
    remembered password (the caller asks for it)."""
    url, user = remembered(url)
    kr = _keyring()
    if not url or not user or kr is None:
        return None
    try:
        password = kr.get_password(_service(url), user)
    except Exception:  # noqa: BLE001
        return None
    return sign_in(url, user, password) if password else None
