"""RFC 9457 problem details: every error the service returns is ``application/problem+json``."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from fastapi.responses import JSONResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://cxr-triage.dev/problems/"


class Problem(Exception):
    """An error meant for the client: raise it anywhere, the app turns it into problem+json.

    ``slug`` names the problem type (``unsupported-media-type``, ``queue-full`` …) so clients can
    branch on ``type`` without parsing ``detail``.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.slug = slug or self.title.lower().replace(" ", "-")
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_BASE + self.slug

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }

    def to_response(self, **extra: object) -> JSONResponse:
        return JSONResponse(
            {**self.to_dict(), **extra},
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )
