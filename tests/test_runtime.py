"""Model loading: a folder that does not fit its card, or is missing, must stop the service with a
message that says what is wrong; a good one reports the provider it actually runs on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.card import ModelCard
from app.inference.runtime import (
    CPU,
    CUDA,
    ModelLoadError,
    ModelRuntime,
    check_model_folder,
    choose_providers,
    gpu_visible,
)
from tests.model_fixtures import build_tiny_graph, build_tiny_model, tiny_card, write_model_folder


def test_loads_validates_and_warms_up(tiny_model_dir: Path) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, providers="cpu", intra_op_threads=1)
    assert runtime.providers == [CPU] == runtime.requested_providers
    assert runtime.provider == CPU
    assert runtime.device == "cpu"
    assert runtime.card == ModelCard.load(tiny_model_dir / "model_card.json")
    assert not runtime.warmed_up
    runtime.warm_up((1, 4))
    assert runtime.warmed_up
    assert runtime.heatmap_grid == (3, 4)
    assert runtime.run_count == 2
    assert runtime.image_count == 5
    logits, heatmap = runtime.run(np.zeros((2, 3, 48, 64), np.float32))
    assert logits.shape == (2, 15)
    assert heatmap.shape == (2, 3, 4)


def test_auto_provider_follows_the_machine(tiny_model_dir: Path) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, providers="auto", intra_op_threads=1)
    expected = CUDA if CUDA in ort.get_available_providers() and gpu_visible() else CPU
    assert runtime.provider == expected
    assert runtime.providers[-1] == CPU


@pytest.mark.skipif(gpu_visible(), reason="this machine has a GPU: forcing CUDA would succeed")
def test_forced_cuda_without_gpu_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="cuda"):
        ModelRuntime.load(tiny_model_dir, providers="cuda", intra_op_threads=1)


def test_cpu_setting_never_tries_cuda() -> None:
    assert choose_providers("cpu") == [CPU]


def test_missing_folder_says_how_to_get_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        check_model_folder(tmp_path / "nope")
    message = str(err.value)
    assert "No model folder" in message
    assert "CXR_MODEL_DIR" in message
    assert "cxr-triage export" in message
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"lacks model_card\.json"):
        ModelRuntime.load(tmp_path / "half")


def test_sha_mismatch_is_refused(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m")
    card = json.loads((folder / "model_card.json").read_text())
    card["onnx_sha256"] = "0" * 64
    (folder / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="sha256"):
        ModelRuntime.load(folder)


def test_invalid_card_is_refused(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m")
    card = json.loads((folder / "model_card.json").read_text())
    del card["thresholds"]["diagnosis"]["Hernia"]
    (folder / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="not a valid model card"):
        ModelRuntime.load(folder)
    (folder / "model_card.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid model card"):
        ModelRuntime.load(folder)


@pytest.mark.parametrize(
    ("graph_kwargs", "message"),
    [
        ({"n_logits": 14}, r"15 labels"),
        ({"input_name": "image"}, r"no input named 'pixel_values'"),
        ({"heatmap_rank": 2}, r"'heatmap' has shape .* \[N, h, w\]"),
        ({"height": 64, "width": 64}, r"card says"),
    ],
)
def test_graph_that_does_not_fit_the_card(
    tmp_path: Path, graph_kwargs: dict[str, object], message: str
) -> None:
    # The card always describes the default tiny model (48x64 input, 15 labels).
    graph = build_tiny_graph(**graph_kwargs)  # type: ignore[arg-type]
    folder = write_model_folder(tmp_path / "m", graph, tiny_card("0" * 64))
    with pytest.raises(ModelLoadError, match=message) as err:
        ModelRuntime.load(folder)
    assert "does not match model_card.json" in str(err.value)


def test_garbage_onnx_is_a_load_error(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    card = ModelCard.load(folder / "model_card.json")
    card.onnx_sha256 = hashlib.sha256(b"not an onnx file").hexdigest()
    card.save(folder / "model_card.json")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load"):
        ModelRuntime.load(folder)


def test_a_stream_session_that_cannot_load_leaves_one_stream(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The second (stream) session is a second copy of the weights; when it cannot be made (out of
    # memory on a big model) the service runs one stream instead of refusing to start. The fault
    # is injected into the second construction only: the first session is ONNX Runtime's own.
    real = ort.InferenceSession
    made: list[object] = []

    def second_fails(*args: object, **kwargs: object) -> ort.InferenceSession:
        if made:
            raise RuntimeError("Failed to allocate memory for requested buffer")
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", second_fails)
    runtime = ModelRuntime.load(tiny_model_dir, providers="cpu", intra_op_threads=2, streams=2)
    assert runtime.stream_session is None and runtime.streams == 1
    assert "one inference stream" in caplog.text and "allocate memory" in caplog.text
    logits, _ = runtime.run(np.zeros((1, 3, 48, 64), np.float32), concurrent=True)
    assert logits.shape == (1, 15)
    monkeypatch.undo()
    both = ModelRuntime.load(tiny_model_dir, providers="cpu", intra_op_threads=2, streams=2)
    assert both.stream_session is not None and both.streams == 2
