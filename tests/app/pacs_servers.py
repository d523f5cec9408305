"""Real servers on 127.0.0.1 for the hospital-deployment tests: Orthanc with its DICOMweb plugin (a PACS) and a tiny
OpenID Connect issuer (RSA keys made here; discovery document, JWKS and a password-grant token endpoint).

Orthanc is Debian's ``orthanc`` + ``orthanc-dicomweb`` packages (``.ci/run`` installs them), started as a plain
process with a JSON configuration in a temporary folder, on free ports, without authentication, and stopped after.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from app_helpers import free_port

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


def orthanc_binary() -> Optional[str]:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                           None)


def dicomweb_plugin() -> Optional[str]:
    for d in ORTHANC_PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


def require_orthanc() -> Tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin); in CI a missing Orthanc fails the test (never a silent skip)."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    msg = ("Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc orthanc-dicomweb; "
           ".ci/run installs them when missing)")
    if os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


class Orthanc:
    """One Orthanc process: ``url`` is its DICOMweb root (``http://127.0.0.1:PORT/dicom-web``)."""

    def __init__(self, folder: Path):
        binary, plugin = require_orthanc()
        self.folder = folder
        self.port = free_port()
        config = {
            "Name": "spmamba-tests", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.port, "HttpServerEnabled": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": False, "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/dicom-web"
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {(folder / 'orthanc.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/studies", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def client(self):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.url)

    def store_folder(self, folder: Path) -> None:
        import pydicom

        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        self.client().store_instances([pydicom.dcmread(str(p)) for p in files])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class OidcIssuer:
    """A minimal OpenID Connect issuer on 127.0.0.1: ``/.well-known/openid-configuration``, ``/jwks`` and a
    password-grant ``/token`` for the users given to :meth:`add_user`. Tokens are RS256, roles under
    ``realm_access.roles`` (Keycloak's layout, MONAI Label's default claim)."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:12]
        self.users: Dict[str, Tuple[str, List[str]]] = {}
        self.token_lifetime = 3600
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/realms/spmamba"
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = urllib.parse.urlparse(self.path).path
                if path == "/realms/spmamba/.well-known/openid-configuration":
                    self._json(200, {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks",
                                     "token_endpoint": issuer.url + "/token",
                                     "id_token_signing_alg_values_supported": ["RS256"]})
                elif path == "/realms/spmamba/jwks":
                    self._json(200, {"keys": [issuer.jwk()]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                if urllib.parse.urlparse(self.path).path != "/realms/spmamba/token":
                    return self._json(404, {"error": "not found"})
                user = (form.get("username") or [""])[0]
                password = (form.get("password") or [""])[0]
                if (form.get("grant_type") or [""])[0] != "password" or issuer.users.get(user, ("\0",))[0] != password:
                    return self._json(401, {"error": "invalid_grant"})
                token = issuer.token(user, issuer.users[user][1])
                self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": issuer.token_lifetime})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jwk(self) -> dict:
        pub = self.key.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": _b64(pub.n), "e": _b64(pub.e)}

    def add_user(self, name: str, password: str, roles: List[str]) -> None:
        self.users[name] = (password, list(roles))

    def token(self, user: str, roles: List[str], expires_in: Optional[int] = None, issuer: Optional[str] = None,
              key=None) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": issuer or self.url, "sub": user, "preferred_username": user, "aud": "account",
                  "iat": now, "exp": now + (self.token_lifetime if expires_in is None else expires_in),
                  "realm_access": {"roles": list(roles)}}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
