"""Schemathesis against the app's own ``/openapi.json``: no 5xx, and answers as documented.

Every operation is driven with schema-valid requests (real tiny PNGs and JPEGs, multipart and raw
bodies) and with schema-violating ones, with API keys configured so that ``ignored_auth`` can
check that each protected route really refuses a request without a key. Example counts are
bounded to keep the module to a few seconds.

schemathesis's pytest plugin (``from_fixture``) does not run under pytest 9, so the operations'
hypothesis strategies are driven directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings

KEY = "schemathesis-key-0123456789abcdef"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
]
EXAMPLES = {"POST /predict": 40}
DEFAULT_EXAMPLES = 10


@pytest.fixture(scope="module")
def schema(tiny_model_dir: Path) -> schemathesis.BaseSchema:
    settings_ = Settings(
        model_dir=tiny_model_dir,
        intra_op_threads=1,
        audit_db=None,
        api_keys=KEY,
        metrics_require_key=True,
        max_upload_mb=4,
        log_json=False,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))


def test_schema_lists_every_route(schema: schemathesis.BaseSchema) -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {
        "POST /predict",
        "GET /v1/model",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES.get(operation.label, DEFAULT_EXAMPLES),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            # A route without parameters or body has no invalid request to generate.
            assert mode is GenerationMode.NEGATIVE, operation.label
