"""problem+json for every error: request ids, and the exception handlers ``create_app`` installs."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.problems import Problem
from app.ops.logs import REQUEST_ID_HEADER

logger = logging.getLogger(__name__)

# -- request ids ---------------------------------------------------------------------------------
# app.ops.logs.RequestIdMiddleware gives every request an id (the client's X-Request-ID when it is a
# plain token), in request.state, the log context and the response header.


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex
    return rid


# -- errors --------------------------------------------------------------------------------------


def _problem_response(request: Request, problem: Problem) -> Response:
    response = problem.to_response(request_id=request_id_of(request))
    response.headers[REQUEST_ID_HEADER] = request_id_of(request)
    return response


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return _problem_response(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    ]
    detail = "Invalid request: " + "; ".join(errors) if errors else "Invalid request."
    return _problem_response(request, Problem(422, detail, slug="invalid-request"))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return _problem_response(request, Problem(exc.status_code, detail, headers=exc.headers))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error", exc_info=exc)
    problem = Problem(
        500,
        f"Internal error. Quote request id {request_id_of(request)} when reporting it.",
        slug="internal-error",
    )
    return _problem_response(request, problem)


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app can raise answers RFC 9457 problem+json with the request id."""
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
