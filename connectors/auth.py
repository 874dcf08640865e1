"""FHIR authentication: none, a static bearer token, or SMART Backend Services (signed JWT client assertion)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import requests

from connectors.errors import FhirAuthError, FhirTemporaryError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Auth:
    """Adds credentials to requests; `refresh()` is called once after a 401."""

    can_refresh = False

    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self) -> None:
        pass


class BearerAuth(Auth):
    def __init__(self, token: str) -> None:
        if not token:
            raise FhirAuthError("NVA_FHIR_AUTH=bearer needs NVA_FHIR_TOKEN")
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}


def check_private_key(pem: bytes, alg: str) -> None:
    """Refuse, with what to do, a key that cannot sign `alg` assertions: not PEM, a public key, wrong kind."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # an encrypted key given without a password
        raise FhirAuthError(
            "NVA_FHIR_PRIVATE_KEY is encrypted; give an unencrypted PEM private key (PKCS#8 or PKCS#1)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        looks_public = b"PUBLIC KEY" in pem[:200] or b"BEGIN CERTIFICATE" in pem[:200]
        raise FhirAuthError(
            "NVA_FHIR_PRIVATE_KEY is a public key or certificate, not the private key; give the private key "
            "whose public half is registered with the server"
            if looks_public
            else "NVA_FHIR_PRIVATE_KEY is not a PEM private key (a file whose first line names a PRIVATE KEY); check the path"
        ) from exc
    if alg == "RS384" and not isinstance(key, rsa.RSAPrivateKey):
        raise FhirAuthError(
            f"NVA_FHIR_JWT_ALG=RS384 needs an RSA key, but the key is {type(key).__name__.removesuffix('PrivateKey')}; "
            "set NVA_FHIR_JWT_ALG=ES384 for an EC (P-384) key"
        )
    if alg == "ES384":
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FhirAuthError(
                "NVA_FHIR_JWT_ALG=ES384 needs an EC P-384 key; set NVA_FHIR_JWT_ALG=RS384 for RSA"
            )
        if key.curve.name != "secp384r1":
            raise FhirAuthError(f"ES384 needs a P-384 (secp384r1) key, not {key.curve.name}")


class SmartBackendAuth(Auth):
    """client_credentials grant with a private_key_jwt assertion; the token is cached until shortly before expiry."""

    can_refresh = True

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        private_key_pem: bytes,
        alg: str = "RS384",
        kid: str | None = None,
        scope: str = "system/*.read",
        session: requests.Session | None = None,
        verify: bool | str = True,
        timeout: tuple[float, float] = (5, 30),
    ) -> None:
        if alg not in ("RS384", "ES384"):
            raise FhirAuthError(
                f"JWT algorithm {alg} is not allowed by SMART Backend Services; use RS384 or ES384"
            )
        if not client_id:
            raise FhirAuthError("SMART auth needs NVA_FHIR_CLIENT_ID")
        check_private_key(private_key_pem, alg)
        self.token_url = token_url
        self.client_id = client_id
        self._key = private_key_pem
        self.alg = alg
        self.kid = kid
        self.scope = scope
        self._session = session or requests.Session()
        self._verify = verify
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.token_requests = 0

    @classmethod
    def from_key_file(cls, path: str, **kwargs) -> SmartBackendAuth:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise FhirAuthError(f"cannot read the SMART private key {path}: {exc.strerror}") from exc
        return cls(private_key_pem=pem, **kwargs)

    def _assertion(self) -> str:
        import jwt  # PyJWT, imported here so sources without SMART need no crypto import

        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 240,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self.kid} if self.kid else None
        try:
            return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)
        except (ValueError, TypeError, AttributeError, jwt.PyJWTError) as exc:
            raise FhirAuthError(
                f"the private key cannot sign {self.alg} assertions ({exc.__class__.__name__}); check "
                "NVA_FHIR_PRIVATE_KEY and NVA_FHIR_JWT_ALG"
            ) from exc

    def _fetch(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self._assertion(),
        }
        self.token_requests += 1
        try:
            resp = self._session.post(self.token_url, data=form, timeout=self._timeout, verify=self._verify)
        except requests.RequestException as exc:
            raise FhirTemporaryError(
                f"token endpoint unreachable: {exc.__class__.__name__}", url=self.token_url
            ) from exc
        if resp.status_code >= 500:
            raise FhirTemporaryError(
                f"token endpoint error {resp.status_code}", url=self.token_url, status=resp.status_code
            )
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or "access_token" not in body:
            reason = body.get("error_description") or body.get("error") or f"HTTP {resp.status_code}"
            raise FhirAuthError(
                f"token request refused: {reason}; check the client id, key and its registration",
                url=self.token_url,
                status=resp.status_code,
            )
        self._token = body["access_token"]
        self._expires_at = time.monotonic() + max(float(body.get("expires_in", 300)) - 30, 1)

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def refresh(self) -> None:
        with self._lock:
            self._token = None
            self._fetch()
