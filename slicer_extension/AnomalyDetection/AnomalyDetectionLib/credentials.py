"""Where the module keeps a password between Slicer sessions: the system keyring, or nowhere.

The server URL and the user name are remembered in Slicer's settings (the Widget); the password only through the
``keyring`` package (the desktop's secret service, macOS Keychain, Windows Credential Locker) when it is installed
in Slicer's Python and has a usable backend (``pip_install("keyring")`` from Slicer's Python console adds it). Without
one the password is kept in memory for the session only and asked again next time; it is never written to a file or
to the scene. Standard library + optional keyring; no Qt.
"""
from __future__ import annotations

from typing import Optional

SERVICE_PREFIX = "spmamba:"  # the same entry `spmamba login` uses, so one sign-in serves both


def _keyring():
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - not installed, or no usable backend
        return None
    if isinstance(backend, fail.Keyring) or "null" in type(backend).__module__.lower():
        return None
    return keyring


def available() -> bool:
    """Whether a password can be stored safely (a system keyring)."""
    return _keyring() is not None


def save_password(url: str, user: str, password: str) -> bool:
    """Store ``password`` in the keyring; False (nothing stored) without one."""
    kr = _keyring()
    if kr is None or not user:
        return False
    try:
        kr.set_password(SERVICE_PREFIX + url, user, password)
    except Exception:  # noqa: BLE001 - a locked keyring: do not store
        return False
    return True


def load_password(url: str, user: str) -> Optional[str]:
    kr = _keyring()
    if kr is None or not user:
        return None
    try:
        return kr.get_password(SERVICE_PREFIX + url, user)
    except Exception:  # noqa: BLE001
        return None


def forget_password(url: str, user: str) -> None:
    kr = _keyring()
    if kr is None or not user:
        return
    try:
        kr.delete_password(SERVICE_PREFIX + url, user)
    except Exception:  # noqa: BLE001 - nothing stored
        pass
