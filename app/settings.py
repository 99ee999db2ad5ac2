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
    inference_streams: int | Literal["auto"] = Field(
        "auto",
        description="Session runs at once while requests are backed up (CPU only; each gets "
        "intra_op_threads / streams threads, a lone request still gets them all): 'auto' = one "
        "per intra-op thread on CPU (up to 8), 1 on CUDA",
    )
    max_batch_size: int = Field(8, ge=1, description="Images per session run at most")
    batch_probe: bool = Field(
        True,
        description="At start-up, time batches of 1, 2, 4 .. max_batch_size and cap batches at "
        "the size that scores an image fastest on this host (batching a ViT-B/16 on CPU only "
        "adds queueing; a GPU or a small CNN gains from it)",
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0.0, description="Longest wait to fill a batch (Triton's max_queue_delay)"
    )
    max_queue_size: int = Field(64, ge=1, description="Decoded images waiting; past it, 503")
    decode_workers: int = Field(2, ge=1, description="Threads decoding uploads")
    decode_processes: int | Literal["auto"] = Field(
        "auto",
        description="Decode worker processes beside the threads (0 = threads only; 'auto' = "
        "cores - 2, capped at 32, when the model runs on CUDA and the host has >= 8 cores, else 0)",
    )
    reduced_decode: bool = Field(
        False,
        description="Decode JPEG and JPEG 2000 uploads straight towards the model's size when no "
        "heatmap is asked for (2-4x faster on large images; probabilities move by up to a few "
        "hundredths against the full decode, so off by default)",
    )
    ort_spinning: bool = Field(
        True,
        description="Let ONNX Runtime's intra-op threads busy-wait between the operators of a "
        "run (faster runs); they stop when the run ends (session.force_spinning_stop), so they "
        "do not take the cores from the decode workers between runs",
    )
    max_upload_mb: float = Field(50.0, gt=0, description="Largest upload accepted (413 past it)")
    max_pixels: int = Field(
        60_000_000, gt=0, description="Largest decoded image (decompression-bomb guard)"
    )
    eligibility: Literal["enforce", "warn"] = Field(
        "enforce",
        description="A DICOM that is not a frontal chest radiograph (docs/serving.md, "
        "'Eligibility'): enforce = 422 not-eligible; warn = scored, with a warning",
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

    # -- PACS integration (DESIGN.md "PACS integration"; names fixed there) --------------------
    pacs_enabled: bool = Field(
        True,
        description="Run the PACS side (DICOM SCP, STOW-RS, study triage, outbox); false leaves "
        "only POST /predict",
    )
    dicom_port: int = Field(11112, ge=0, le=65535, description="C-STORE SCP port; 0 turns it off")
    dicom_ae_title: str = Field("CXR_TRIAGE", description="The SCP's AE title (called AE)")
    dicom_allowed_aes: str = Field(
        "", description="Comma list of calling AE titles allowed to associate; empty = any"
    )
    dicom_bind: str = Field(
        "127.0.0.1",
        description="Interface the SCP listens on; loopback unless an operator opens it (as "
        "for HTTP), since an open SCP takes patient data from anyone who knows the AE title",
    )
    dicom_tls_cert: Path | None = Field(None, description="PEM certificate: DICOM over TLS")
    dicom_tls_key: Path | None = Field(None, description="PEM private key of dicom_tls_cert")
    dicom_tls_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, SCUs must present a certificate it signed"
    )
    study_stable_s: float = Field(
        10.0, gt=0.0, description="Seconds without a new instance before a study is scored"
    )
    pacs_storage_dir: Path = Field(
        Path("pacs"),
        description="Received instances (instances/) and written results (results/)",
    )
    outbox_db: Path = Field(
        Path("pacs/outbox.sqlite"),
        description="SQLite outbox of result objects; study state lives beside it (studies.sqlite)",
    )
    priority_rules: str = Field(
        "Pneumothorax:diagnosis=STAT,*:diagnosis=HIGH",
        description="Comma list of Label:screening|diagnosis=HIGH|STAT (Label may be *); a "
        "study starts ROUTINE and each matching rule can only raise it",
    )
    destinations: str = Field(
        "",
        description="Comma list of dimse://AET@host:port and http(s)://.../dicom-web STOW-RS "
        "roots; empty = keep results for GET /v1/studies only",
    )

    @field_validator("audit_db", mode="before")
    @classmethod
    def _empty_disables_audit(cls, value: object) -> object:
        """``CXR_AUDIT_DB=`` (empty) turns the audit trail off rather than meaning ``.``."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        from app.pacs.model import check_ae_title

        return check_ae_title(value)

    @field_validator("dicom_allowed_aes")
    @classmethod
    def _allowed_aes(cls, value: str) -> str:
        from app.pacs.model import check_ae_title

        for part in value.split(","):
            if part.strip():
                check_ae_title(part.strip())
        return value

    @field_validator("priority_rules")
    @classmethod
    def _priority_rules(cls, value: str) -> str:
        from app.pacs.model import parse_priority_rules

        parse_priority_rules(value, None)  # syntax here; labels against the loaded model's card
        return value

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: str) -> str:
        from app.pacs.model import parse_destinations

        parse_destinations(value)
        return value

    @property
    def allowed_aes(self) -> tuple[str, ...]:
        """``dicom_allowed_aes`` as a tuple (empty: any calling AE may associate)."""
        return tuple(p.strip() for p in self.dicom_allowed_aes.split(",") if p.strip())

    @property
    def studies_db(self) -> Path:
        """Study state (receiving, scored, results), beside the outbox so one folder holds both."""
        return self.outbox_db.with_name("studies.sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, injected into routes with ``Depends(get_settings)``."""
    return Settings()
