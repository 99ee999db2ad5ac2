"""Service settings, read from ``CXR_*`` environment variables (and a ``.env`` file if present)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var ``CXR_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", extra="ignore")

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model folder: model.onnx + card")
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="ONNX Runtime execution provider: CUDA when present (auto), or forced"
    )
    intra_op_threads: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="ONNX Runtime intra-op threads (one per physical core is fastest on CPU)",
    )
    max_batch_size: int = Field(8, ge=1, description="Images per session run at most")
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0, description="Longest wait to fill a batch (Triton's max_queue_delay)"
    )
    max_queue_size: int = Field(64, ge=1, description="Decoded images waiting; past it, 503")
    decode_workers: int = Field(2, ge=1, description="Threads decoding uploads")
    max_upload_mb: float = Field(50.0, gt=0, description="Largest upload accepted (413 past it)")
    max_pixels: int = Field(
        60_000_000, gt=0, description="Largest decoded image (decompression-bomb guard)"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request deadline (504 past it)")
    api_keys: str | None = Field(
        None, description="Comma-separated API keys, or a path to a file with one key per line"
    )
    metrics_require_key: bool = Field(False, description="Require an API key for /metrics too")
    audit_db: Path | None = Field(
        Path("audit.sqlite"), description="SQLite audit trail of predictions; empty to disable"
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0.0,
        description="After SIGTERM, keep answering /readyz and new /predict with 503 at least this "
        "long before closing the listener, so load balancers stop routing here",
    )
    log_level: str = Field("INFO")
    log_json: bool = Field(True, description="Structured JSON log lines")

    @field_validator("audit_db", mode="before")
    @classmethod
    def _empty_disables_audit(cls, value: object) -> object:
        """``CXR_AUDIT_DB=`` (empty) turns the audit trail off rather than meaning ``.``."""
        return None if isinstance(value, str) and not value.strip() else value


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, injected into routes with ``Depends(get_settings)``."""
    return Settings()
