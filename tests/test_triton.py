"""Triton export: parsed with Triton's own ModelConfig protobuf, checked against the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from app.card import ModelCard
from tests.model_fixtures import (
    TINY_HEIGHT,
    TINY_POOL,
    TINY_WIDTH,
    build_tiny_graph,
    build_tiny_model,
    tiny_card,
    write_model_folder,
)
from training.triton import main, write_triton_repository

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (dev extra)"
)

GRID = (TINY_HEIGHT // TINY_POOL, TINY_WIDTH // TINY_POOL)


def parse_config(path: Path):  # -> model_config_pb2.ModelConfig
    """Parse strictly: an unknown field or a wrong type raises, as it would in tritonserver."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return build_tiny_model(tmp_path / "tiny")


def test_config_matches_graph_card_and_knobs(model_dir: Path, tmp_path: Path) -> None:
    target = write_triton_repository(
        model_dir,
        tmp_path / "repo",
        max_batch_size=16,
        max_queue_delay_microseconds=500,
        instance_count=2,
        kind="KIND_GPU",
    )
    assert target == tmp_path / "repo" / "tiny"
    config = parse_config(target / "config.pbtxt")
    card = ModelCard.load(model_dir / "model_card.json")

    assert config.name == "tiny"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (pixel,) = config.input
    assert pixel.name == "pixel_values"
    assert pixel.data_type == model_config_pb2.TYPE_FP32
    assert list(pixel.dims) == [3, TINY_HEIGHT, TINY_WIDTH]
    outputs = {o.name: o for o in config.output}
    assert set(outputs) == {"logits", "heatmap"}
    assert list(outputs["logits"].dims) == [len(card.labels)]
    assert outputs["logits"].label_filename == "labels.txt"
    assert list(outputs["heatmap"].dims) == list(GRID)
    assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in config.output)

    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 500
    assert list(batching.preferred_batch_size) == [4, 8, 16]
    (group,) = config.instance_group
    assert group.count == 2
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

    assert (target / "1" / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()
    assert (target / "labels.txt").read_text().splitlines() == card.labels
    assert json.loads((target / "model_card.json").read_text())["name"] == "tiny"


def test_config_describes_what_the_onnx_really_takes(model_dir: Path, tmp_path: Path) -> None:
    """Feed the copied model a batch shaped from the config: its outputs have the config's dims."""
    target = write_triton_repository(model_dir, tmp_path / "repo", kind="KIND_CPU")
    config = parse_config(target / "config.pbtxt")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    session = ort.InferenceSession(
        str(target / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    batch = 3
    x = np.random.default_rng(0).normal(size=(batch, *config.input[0].dims)).astype(np.float32)
    names = [o.name for o in config.output]
    results = session.run(names, {config.input[0].name: x})
    for output, value in zip(config.output, results, strict=True):
        assert value.shape == (batch, *output.dims)
        assert value.dtype == np.float32


def test_cli_main_and_rewrite_keeps_other_models(model_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    assert (
        main(
            [
                str(model_dir),
                str(repo),
                "--model-name",
                "cxr",
                "--max-batch-size",
                "4",
                "--max-queue-delay-us",
                "100",
                "--kind",
                "KIND_AUTO",
            ]
        )
        == 0
    )
    stale = repo / "cxr" / "1" / "stale.onnx"
    stale.write_bytes(b"old")
    assert main([str(model_dir), str(repo), "--model-name", "cxr", "--max-batch-size", "4"]) == 0
    assert not stale.exists(), "re-export must replace the version folder"
    config = parse_config(repo / "cxr" / "config.pbtxt")
    assert config.name == "cxr"
    assert config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'


def test_refuses_a_folder_whose_onnx_does_not_match_its_card(
    model_dir: Path, tmp_path: Path
) -> None:
    (model_dir / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="onnx_sha256"):
        write_triton_repository(model_dir, tmp_path / "repo")


def test_refuses_a_fixed_batch_dimension(tmp_path: Path) -> None:
    graph = build_tiny_graph()
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    folder = write_model_folder(tmp_path / "fixed", graph)
    with pytest.raises(ValueError, match="fixed batch"):
        write_triton_repository(folder, tmp_path / "repo")


def test_refuses_a_card_whose_labels_disagree_with_logits(tmp_path: Path) -> None:
    card = tiny_card("0" * 64, labels=("Atelectasis", "Effusion"))
    folder = write_model_folder(tmp_path / "short", build_tiny_graph(), card)
    with pytest.raises(ValueError, match="logits"):
        write_triton_repository(folder, tmp_path / "repo")


def test_refuses_a_graph_without_the_contract_input(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "renamed", input_name="image")
    with pytest.raises(ValueError, match="pixel_values"):
        write_triton_repository(folder, tmp_path / "repo")


def test_fills_symbolic_spatial_dims_from_the_card(tmp_path: Path) -> None:
    graph = build_tiny_graph()
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.checker.check_model(graph)
    folder = write_model_folder(tmp_path / "symbolic", graph)
    config = parse_config(write_triton_repository(folder, tmp_path / "repo") / "config.pbtxt")
    assert list(config.input[0].dims) == [3, TINY_HEIGHT, TINY_WIDTH]
