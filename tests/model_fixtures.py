"""Build a tiny model folder that honours the DESIGN.md contract, with the ``onnx`` helper API.

The graph is small enough to build and run in milliseconds, yet real: ONNX Runtime executes it
exactly as it would an exported ViT (same input/output names, dynamic batch, opset 17). It
averages the input's channels, average-pools them to a coarse grid, and feeds the grid to a
linear layer; the heatmap is the pooled grid min-max normalised to [0, 1] per image. The input
is deliberately not square so that height/width mix-ups fail the tests.

Later the tests may switch to a model exported by the training pipeline; callers should rely only
on :func:`build_tiny_model`'s signature and the contract, not on the graph's internals.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.card import InputSpec, ModelCard, Threshold, Thresholds
from app.labels import NIH_LABELS

OPSET = 17
# ONNX Runtime in .venv reads IR versions up to 13; newer onnx writes 14 by default.
IR_VERSION = 9
TINY_HEIGHT, TINY_WIDTH = 48, 64
TINY_POOL = 16  # grid = (48 / 16, 64 / 16) = (3, 4)


def build_tiny_graph(
    *,
    height: int = TINY_HEIGHT,
    width: int = TINY_WIDTH,
    pool: int = TINY_POOL,
    n_logits: int = len(NIH_LABELS),
    input_name: str = "pixel_values",
    heatmap_rank: int = 3,
    seed: int = 0,
) -> onnx.ModelProto:
    """The tiny contract graph; the keyword arguments exist to build broken variants for tests."""
    if height % pool or width % pool:
        raise ValueError("height and width must be multiples of pool")
    gh, gw = height // pool, width // pool
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 3.0, size=(gh * gw, n_logits)).astype(np.float32)
    bias = rng.normal(0.0, 1.0, size=(n_logits,)).astype(np.float32)

    nodes = [
        helper.make_node("ReduceMean", [input_name], ["gray"], axes=[1], keepdims=1),
        helper.make_node(
            "AveragePool", ["gray"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logits"]),
        helper.make_node("Reshape", ["pooled", "grid_shape"], ["grid"]),
        helper.make_node("ReduceMin", ["grid"], ["grid_min"], axes=[1, 2], keepdims=1),
        helper.make_node("ReduceMax", ["grid"], ["grid_max"], axes=[1, 2], keepdims=1),
        helper.make_node("Sub", ["grid", "grid_min"], ["shifted"]),
        helper.make_node("Sub", ["grid_max", "grid_min"], ["span"]),
        helper.make_node("Add", ["span", "eps"], ["span_eps"]),
        helper.make_node("Div", ["shifted", "span_eps"], ["heatmap3"]),
    ]
    grid_shape = [0, gh, gw]
    heatmap_out = "heatmap3"
    if heatmap_rank != 3:
        # A broken variant: flatten the map so the output has rank 2.
        nodes.append(helper.make_node("Flatten", ["heatmap3"], ["heatmap2"], axis=1))
        heatmap_out = "heatmap2"
    nodes.append(helper.make_node("Identity", [heatmap_out], ["heatmap"]))

    initializers = [
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.array(grid_shape, dtype=np.int64), "grid_shape"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"),
    ]
    heatmap_shape: list[int | str] = ["N", gh, gw] if heatmap_rank == 3 else ["N", gh * gw]
    graph = helper.make_graph(
        nodes,
        "cxr_tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, height, width])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_logits]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, heatmap_shape),
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cxr-triage-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def tiny_card(
    onnx_sha256: str,
    *,
    name: str = "tiny",
    height: int = TINY_HEIGHT,
    width: int = TINY_WIDTH,
    labels: tuple[str, ...] = NIH_LABELS,
) -> ModelCard:
    """A valid card; thresholds vary by label so that flag logic is exercised, not a constant."""
    screening = {
        lbl: Threshold(threshold=0.2 + 0.02 * i, sensitivity=0.95, specificity=0.3)
        for i, lbl in enumerate(labels)
    }
    diagnosis = {
        lbl: Threshold(threshold=0.5 + 0.02 * i, sensitivity=0.7, specificity=0.7)
        for i, lbl in enumerate(labels)
    }
    return ModelCard(
        name=name,
        version="0.0.1-test",
        created=datetime(2024, 1, 1, tzinfo=timezone.utc),
        architecture="tiny-pool-linear",
        onnx_sha256=onnx_sha256,
        labels=list(labels),
        input=InputSpec(
            height=height,
            width=width,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            interpolation="bilinear",
        ),
        heatmap_method="cam",
        thresholds=Thresholds(screening=screening, diagnosis=diagnosis),
        intended_use="Tests only: random weights.",
        limitations="Not a medical model.",
    )


def write_model_folder(folder: Path, model: onnx.ModelProto, card: ModelCard | None = None) -> Path:
    """Write ``model.onnx`` and ``model_card.json``; the card's sha256 is set from the file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    card = tiny_card(sha) if card is None else card.model_copy(update={"onnx_sha256": sha})
    card.save(folder / "model_card.json")
    return folder


def build_tiny_model(folder: Path, **graph_kwargs: object) -> Path:
    """Build the tiny graph and its card into ``folder``; returns the folder."""
    return write_model_folder(folder, build_tiny_graph(**graph_kwargs))  # type: ignore[arg-type]
