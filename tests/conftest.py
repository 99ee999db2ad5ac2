"""Shared fixtures. Real data comes from ``CXR_DATA_DIR`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The PACS side (DICOM SCP on 11112, study state on disk) is off unless a test turns it on, so
# apps built by other tests neither fight over one port nor write pacs/ into the checkout.
os.environ.setdefault("CXR_PACS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder; tests that need it skip on a machine without it."""
    if not (DATA_DIR / "nih" / "labels.csv").is_file():
        pytest.skip(f"shared data not found at {DATA_DIR} (set CXR_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def nih_dir(data_dir: Path) -> Path:
    return data_dir / "nih"


@pytest.fixture(scope="session")
def dicom_dir(data_dir: Path) -> Path:
    return data_dir / "dicom"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model folder honouring the DESIGN.md contract (real ONNX graph, valid card)."""
    from tests.model_fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
