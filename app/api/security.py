"""API keys: who may call ``/predict`` and ``/v1/model`` (and ``/metrics`` when configured).

Keys come from ``CXR_API_KEYS``: a comma-separated list, or the path of a file with one key per
line (``#`` starts a comment). With no keys configured the service is open, as it is on a laptop;
behind a hospital network's reverse proxy operators set keys. A client sends its key as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Only SHA-256 digests of the keys are kept, and a presented key is compared against every one of
them with :func:`hmac.compare_digest` without stopping at a match, so neither timing nor an
exception tells a caller which key (or how much of one) it got right. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.problems import Problem
from app.settings import Settings

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`Authorization: Bearer <key>` with one of the keys in `CXR_API_KEYS`.",
)
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="apiKey",
    description="The same key in an `X-API-Key` header, for clients that cannot set Bearer.",
)


class ApiKeyConfigError(ValueError):
    """``CXR_API_KEYS`` cannot be used as given: refuse to start rather than run open."""


def parse_api_keys(spec: str | None) -> tuple[str, ...]:
    """The keys ``spec`` configures: an existing file's lines, else a comma-separated list.

    A value that looks like a path (it holds a ``/``, or ends in ``.txt``/``.keys``) but names no
    file is an error: silently treating ``/etc/cxr/keys`` as the key itself would leave the
    service protected by a guessable string.
    """
    if spec is None or not spec.strip():
        return ()
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        keys = [line.split("#", 1)[0].strip() for line in lines]
    elif "/" in spec or "\\" in spec or path.suffix in {".txt", ".keys"}:
        raise ApiKeyConfigError(f"CXR_API_KEYS names a key file that does not exist: {path}")
    else:
        keys = [part.strip() for part in spec.split(",")]
    unique = tuple(dict.fromkeys(key for key in keys if key))
    if not unique:
        raise ApiKeyConfigError("CXR_API_KEYS is set but holds no key")
    short = sum(len(key) < MIN_KEY_LENGTH for key in unique)
    if short:
        logger.warning(
            "some API keys are short; use long random keys",
            extra={"short_keys": short, "min_length": MIN_KEY_LENGTH},
        )
    return unique


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeyAuth:
    """The configured keys (as digests) and which routes need one."""

    digests: tuple[bytes, ...] = ()
    protect_metrics: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeyAuth:
        keys = parse_api_keys(settings.api_keys)
        auth = cls(tuple(_digest(key) for key in keys), settings.metrics_require_key)
        logger.info(
            "API keys %s",
            "required" if auth.enabled else "not configured: the API is open",
            extra={"api_keys": len(keys), "metrics_require_key": auth.protect_metrics},
        )
        return auth

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is one of the keys, in time independent of which one."""
        presented = _digest(candidate)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def check(self, bearer: str | None, header_key: str | None) -> None:
        """Raise a 401 problem unless a presented key is valid (no-op when no keys are set)."""
        if not self.enabled:
            return
        presented = [key for key in (bearer, header_key) if key]
        if not presented:
            raise Problem(
                401,
                f"An API key is required: send 'Authorization: Bearer <key>' or "
                f"'{API_KEY_HEADER}: <key>'.",
                slug="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Evaluate every presented key so the response time does not depend on which was right.
        valid = [self.matches(key) for key in presented]
        if not any(valid):
            raise Problem(
                401,
                "The API key is not valid.",
                slug="unauthorized",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )


def get_auth(request: Request) -> ApiKeyAuth:
    """The app's :class:`ApiKeyAuth`, built once at start-up by ``create_app``.

    Fails closed: an app that never configured authentication answers 500, not an open API.
    """
    auth = getattr(request.app.state, "auth", None)
    if not isinstance(auth, ApiKeyAuth):
        raise RuntimeError("app.state.auth is not set: create_app must install ApiKeyAuth")
    return auth


async def require_api_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    header_key: str | None = Security(_api_key_header),
) -> None:
    """FastAPI dependency for routes that need a key whenever keys are configured."""
    get_auth(request).check(bearer.credentials if bearer else None, header_key)


async def require_metrics_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    header_key: str | None = Security(_api_key_header),
) -> None:
    """Like :func:`require_api_key`, for ``/metrics`` only when ``CXR_METRICS_REQUIRE_KEY``."""
    auth = get_auth(request)
    if auth.protect_metrics:
        auth.check(bearer.credentials if bearer else None, header_key)
