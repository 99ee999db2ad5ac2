"""The decode pools (issue 14): the worker-process pool gives the thread path's answers and
errors, survives a worker dying, and the reduced JPEG decode stays close to the full one."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api.problems import Problem
from app.card import InputSpec
from app.imaging.decode import REDUCE_GAP, decode_image
from app.imaging.prepare import DecodeProcesses, decode_processes_for, prepare_input
from app.imaging.preprocess import to_model_input
from app.main import create_app
from app.settings import Settings

SPEC = InputSpec(height=224, width=224, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_auto_rule_picks_processes_only_on_many_core_gpu_hosts() -> None:
    assert decode_processes_for("auto", "cuda", 16) == 14
    assert decode_processes_for("auto", "cuda", 64) == 32
    assert decode_processes_for("auto", "cuda", 4) == 0
    assert decode_processes_for("auto", "cpu", 64) == 0
    assert decode_processes_for(3, "cpu", 2) == 3
    assert decode_processes_for(0, "cuda", 64) == 0


@pytest.fixture(scope="module")
def processes() -> DecodeProcesses:
    pool = DecodeProcesses(1)
    pool.warm_up()
    yield pool
    pool.shutdown()


def _in_process(pool: DecodeProcesses, data: bytes, hint: str | None = None) -> object:
    return asyncio.run(pool.prepare(data, hint, SPEC, 60_000_000))


def test_worker_gives_the_thread_path_input_without_the_pixels(
    processes: DecodeProcesses, nih_dir: Path
) -> None:
    data = next(iter(sorted((nih_dir / "images" / "nih-1024").glob("*.png")))).read_bytes()
    here = prepare_input(data, "image/png", SPEC, 60_000_000, keep_pixels=False)
    there = _in_process(processes, data, "image/png")
    np.testing.assert_array_equal(there.model_input, here.model_input)
    assert there.decoded.pixels.size == 0  # the full-size image never crosses back
    assert (there.decoded.image.rows, there.decoded.image.columns) == (1024, 1024)
    assert there.decoded.source == "png"


def test_worker_errors_are_the_same_problems(processes: DecodeProcesses, dicom_dir: Path) -> None:
    truncated = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    broken = (dicom_dir / "chest" / "pylibjpegdata__966.dcm").read_bytes()
    for data in (truncated, broken, b"%PDF-1.7 not an image"):
        with pytest.raises(Problem) as here:
            prepare_input(data, None, SPEC, 60_000_000, keep_pixels=False)
        with pytest.raises(Problem) as there:
            _in_process(processes, data)
        assert type(there.value) is type(here.value)
        assert there.value.to_dict() == here.value.to_dict()
        assert 400 <= there.value.status < 500


def test_a_dead_worker_costs_one_422_and_the_pool_comes_back(nih_dir: Path) -> None:
    data = next(iter(sorted((nih_dir / "images" / "nih-256").glob("*.png")))).read_bytes()
    pool = DecodeProcesses(1)
    try:
        (pid,) = pool.warm_up()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Problem) as info:
            _in_process(pool, data)
        assert info.value.status == 422 and info.value.slug == "undecodable-image"
        assert _in_process(pool, data).model_input.shape == (3, 224, 224)
    finally:
        pool.shutdown()


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_reduced_jpeg_decode_is_smaller_and_close_to_the_full_one(nih_dir: Path) -> None:
    png = next(iter(sorted((nih_dir / "images" / "nih-1024").glob("*.png"))))
    gray = np.asarray(Image.open(png).convert("L"))
    data = _jpeg(np.asarray(Image.fromarray(gray).resize((2048, 2048), Image.Resampling.BICUBIC)))
    full = decode_image(data)
    reduced = decode_image(data, reduce_to=(224, 224))
    # libjpeg scales by 1/2: 1024 >= 3 x 224 = 672, and 1/4 (512) would fall below it.
    assert full.pixels.shape == (2048, 2048)
    assert reduced.pixels.shape == (1024, 1024)
    assert min(reduced.pixels.shape) >= REDUCE_GAP * 224
    assert (reduced.image.rows, reduced.image.columns) == (2048, 2048)
    a, b = to_model_input(full.pixels, SPEC), to_model_input(reduced.pixels, SPEC)
    # Mean difference under one grey level of 255 (inputs are normalised: x 1/std = 4).
    assert float(np.abs(a - b).mean()) < 4 / 255
    # PNG has no reduced decode: the same pixels either way.
    png_bytes = png.read_bytes()
    np.testing.assert_array_equal(
        decode_image(png_bytes, reduce_to=(224, 224)).pixels, decode_image(png_bytes).pixels
    )


def test_service_with_decode_processes_answers_like_threads(nih_dir: Path) -> None:
    png = next(iter(sorted((nih_dir / "images" / "nih-1024").glob("*.png"))))
    data = png.read_bytes()
    answers = {}
    for n in (0, 1):
        settings = Settings(decode_processes=n, audit_db=None, api_keys=None)
        with TestClient(create_app(settings)) as client:
            assert (client.app.state.decode_processes is not None) == bool(n)
            r = client.post("/predict", files={"file": (png.name, data, "image/png")})
            assert r.status_code == 200, r.text
            answers[n] = [f["probability"] for f in r.json()["findings"]]
            bad = client.post("/predict", files={"file": ("x.png", data[:200], "image/png")})
            assert bad.status_code == 422
            assert bad.headers["content-type"].startswith("application/problem+json")
            heat = client.post(
                "/predict?heatmap=true", files={"file": (png.name, data, "image/png")}
            )
            assert heat.status_code == 200 and heat.json()["heatmap"]["png_base64"]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("name", ["pydicomdata__RG1_J2KR.dcm", "pydicomdata__RG3_J2KI.dcm"])
def test_reduced_jpeg2000_dicom_skips_a_wavelet_level_and_stays_close(
    dicom_dir: Path, name: str
) -> None:
    data = next(dicom_dir.glob(f"*/{name}")).read_bytes()
    full = decode_image(data)
    reduced = decode_image(data, reduce_to=(224, 224))
    # One level fewer: each side halved (rounded up), still >= 3 x 224.
    assert reduced.pixels.shape == tuple(-(-n // 2) for n in full.pixels.shape)
    assert min(reduced.pixels.shape) >= REDUCE_GAP * 224
    assert (reduced.image.rows, reduced.image.columns) == full.pixels.shape
    assert reduced.warnings == full.warnings
    a, b = to_model_input(full.pixels, SPEC), to_model_input(reduced.pixels, SPEC)
    assert float(np.abs(a - b).mean()) < 4 / 255  # under one grey level of 255 on average


def test_asking_for_a_heatmap_never_changes_the_probabilities_unless_reduced_decode_is_on(
    nih_dir: Path,
) -> None:
    png = next(iter(sorted((nih_dir / "images" / "nih-1024").glob("*.png"))))
    gray = np.asarray(Image.open(png).convert("L"))
    data = _jpeg(np.asarray(Image.fromarray(gray).resize((2048, 2048), Image.Resampling.BICUBIC)))
    probs = {}
    for reduced in (False, True):
        settings = Settings(reduced_decode=reduced, audit_db=None, api_keys=None)
        with TestClient(create_app(settings)) as client:
            for heat in ("false", "true"):
                r = client.post(
                    f"/predict?heatmap={heat}", files={"file": ("x.jpg", data, "image/jpeg")}
                )
                assert r.status_code == 200, r.text
                probs[reduced, heat] = np.array([f["probability"] for f in r.json()["findings"]])
    np.testing.assert_array_equal(probs[False, "false"], probs[False, "true"])
    np.testing.assert_array_equal(probs[True, "true"], probs[False, "true"])  # overlay: full decode
    # Reduced (libjpeg 1/8 scaling for the 64 px default model): close, not identical.
    assert not np.array_equal(probs[True, "false"], probs[False, "false"])
    assert np.abs(probs[True, "false"] - probs[False, "false"]).max() < 0.02
