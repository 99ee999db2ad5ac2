"""Export a model folder as an NVIDIA Triton Inference Server model repository.

Hospitals that already run Triton should serve our model there rather than run a second engine.
The repository holds the very same ``model.onnx`` (Triton's ONNX Runtime backend) and a
``config.pbtxt`` generated from the ONNX graph itself, so names, data types and dims can never
drift from what the file really takes. The batching knobs mirror the service's own
(``CXR_MAX_BATCH_SIZE`` -> ``max_batch_size``, ``CXR_MAX_BATCH_DELAY_MS`` ->
``max_queue_delay_microseconds``).

Layout written (Triton's model repository convention)::

    REPO_DIR/<model_name>/config.pbtxt
    REPO_DIR/<model_name>/<version>/model.onnx
    REPO_DIR/<model_name>/labels.txt         # output ``logits`` label file, one label a line
    REPO_DIR/<model_name>/model_card.json    # thresholds etc. for clients; Triton ignores it

Needs only ``onnx`` (never torch), so it runs wherever the train extra or ``onnx`` is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from app.card import ModelCard

if TYPE_CHECKING:
    from onnx import ValueInfoProto

InstanceKind = Literal["KIND_GPU", "KIND_CPU", "KIND_AUTO"]

# ONNX TensorProto.DataType value -> Triton model_config.DataType name.
_ONNX_TO_TRITON: dict[int, str] = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TensorConfig:
    """One input or output as Triton sees it: dims exclude the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _tensor_configs(value_infos: Sequence[ValueInfoProto], what: str) -> list[TensorConfig]:
    """Read name, dtype and non-batch dims from ONNX value infos; the first dim must be dynamic."""
    tensors = []
    for info in value_infos:
        name = info.name
        tensor_type = info.type.tensor_type
        data_type = _ONNX_TO_TRITON.get(tensor_type.elem_type)
        if data_type is None:
            raise ValueError(
                f"{what} {name!r}: ONNX element type {tensor_type.elem_type} "
                "has no Triton equivalent"
            )
        dims = list(tensor_type.shape.dim)
        if not dims:
            raise ValueError(f"{what} {name!r} has no shape; Triton needs its rank")
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            raise ValueError(
                f"{what} {name!r} has a fixed batch dimension ({dims[0].dim_value}); the model "
                "folder contract needs a dynamic N for Triton's dynamic batching"
            )
        rest = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims[1:]
        )
        tensors.append(TensorConfig(name=name, data_type=data_type, dims=rest))
    return tensors


def inspect_onnx(model_path: Path) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The graph's real inputs (initialisers excluded) and outputs, as Triton tensor configs."""
    import onnx  # imported here: the serving image has no onnx, and only this path needs it

    model = onnx.load(str(model_path), load_external_data=False)
    initialisers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    return _tensor_configs(inputs, "input"), _tensor_configs(model.graph.output, "output")


def _check_against_card(
    card: ModelCard, inputs: list[TensorConfig], outputs: list[TensorConfig]
) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """Hold the graph to the DESIGN.md contract and fill symbolic H/W/L dims from the card."""
    by_in = {t.name: t for t in inputs}
    by_out = {t.name: t for t in outputs}
    if "pixel_values" not in by_in or len(inputs) != 1:
        raise ValueError(f"expected one input 'pixel_values', got {sorted(by_in)}")
    missing = {"logits", "heatmap"} - set(by_out)
    if missing:
        raise ValueError(f"ONNX outputs lack {sorted(missing)} (have {sorted(by_out)})")

    def settle(tensor: TensorConfig, expected: tuple[int, ...]) -> TensorConfig:
        if len(tensor.dims) != len(expected):
            raise ValueError(
                f"{tensor.name}: rank {len(tensor.dims) + 1}, expected "
                f"{len(expected) + 1} (batch included)"
            )
        dims = []
        for got, want in zip(tensor.dims, expected, strict=True):
            if want > 0 and got > 0 and got != want:
                raise ValueError(
                    f"{tensor.name}: dims {tensor.dims} disagree with the card's {expected}"
                )
            dims.append(got if got > 0 else want)
        return TensorConfig(tensor.name, tensor.data_type, tuple(dims))

    spec = card.input
    pixel = settle(by_in["pixel_values"], (3, spec.height, spec.width))
    logits = settle(by_out["logits"], (len(card.labels),))
    heatmap = settle(by_out["heatmap"], (-1, -1))
    others = [t for t in outputs if t.name not in {"logits", "heatmap"}]
    return [pixel], [logits, heatmap, *others]


def _pbtxt_tensor(tensor: TensorConfig, extra: str = "") -> str:
    dims = ", ".join(str(d) for d in tensor.dims)
    return (
        "  {\n"
        f'    name: "{tensor.name}"\n'
        f"    data_type: {tensor.data_type}\n"
        f"    dims: [ {dims} ]\n"
        f"{extra}"
        "  }"
    )


def render_config(
    model_name: str,
    inputs: list[TensorConfig],
    outputs: list[TensorConfig],
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_microseconds: int,
    instance_count: int,
    kind: InstanceKind,
    label_file: str | None,
) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    out_blocks = [
        _pbtxt_tensor(
            t, f'    label_filename: "{label_file}"\n' if label_file and t.name == "logits" else ""
        )
        for t in outputs
    ]
    preferred = ", ".join(str(b) for b in preferred_batch_sizes)
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + ",\n".join(_pbtxt_tensor(t) for t in inputs) + "\n]\n"
        "output [\n" + ",\n".join(out_blocks) + "\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_microseconds}\n"
        "}\n"
        "instance_group [\n"
        "  {\n"
        f"    count: {instance_count}\n"
        f"    kind: {kind}\n"
        "  }\n"
        "]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def _default_preferred(max_batch_size: int) -> list[int]:
    """Powers of two below the maximum, then the maximum: batches the GPU runs efficiently."""
    sizes = [b for b in (2, 4, 8, 16, 32, 64, 128) if b < max_batch_size]
    return [*sizes[-2:], max_batch_size]


def write_triton_repository(
    model_dir: str | Path,
    repo_dir: str | Path,
    *,
    max_batch_size: int = 8,
    max_queue_delay_microseconds: int = 2000,
    instance_count: int = 1,
    kind: InstanceKind = "KIND_GPU",
    model_name: str | None = None,
    version: int = 1,
    preferred_batch_sizes: Sequence[int] | None = None,
) -> Path:
    """Write ``repo_dir/<model_name>/`` for Triton from a model folder; returns that folder.

    ``model_name`` defaults to the card's ``name``. An existing version folder of the same model
    is replaced, other models in ``repo_dir`` are left alone.
    """
    model_dir, repo_dir = Path(model_dir), Path(repo_dir)
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1 (the model has a dynamic batch dim)")
    if instance_count < 1 or version < 1 or max_queue_delay_microseconds < 0:
        raise ValueError("instance_count and version must be >= 1, the queue delay >= 0")
    if kind not in ("KIND_GPU", "KIND_CPU", "KIND_AUTO"):
        raise ValueError(f"kind must be KIND_GPU, KIND_CPU or KIND_AUTO, not {kind!r}")
    onnx_path = model_dir / "model.onnx"
    card_path = model_dir / "model_card.json"
    card = ModelCard.load(card_path)
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if digest != card.onnx_sha256:
        raise ValueError(f"{onnx_path} does not match the card's onnx_sha256; re-export the folder")

    name = model_name or card.name
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' only")
    preferred = sorted(set(preferred_batch_sizes or _default_preferred(max_batch_size)))
    if any(b < 1 or b > max_batch_size for b in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..{max_batch_size}")

    inputs, outputs = _check_against_card(card, *inspect_onnx(onnx_path))
    target = repo_dir / name
    version_dir = target / str(version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_path, version_dir / "model.onnx")
    shutil.copyfile(card_path, target / "model_card.json")
    (target / "labels.txt").write_text("".join(f"{label}\n" for label in card.labels))
    config = render_config(
        name,
        inputs,
        outputs,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred,
        max_queue_delay_microseconds=max_queue_delay_microseconds,
        instance_count=instance_count,
        kind=kind,
        label_file="labels.txt",
    )
    (target / "config.pbtxt").write_text(config)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.triton MODEL_DIR REPO_DIR``; ``cxr-triage export --triton`` is the
    usual way in."""
    parser = argparse.ArgumentParser(
        prog="python -m training.triton",
        description="Write a Triton model repository (ONNX Runtime backend) for a model folder.",
    )
    parser.add_argument("model_dir", type=Path, help="folder with model.onnx + model_card.json")
    parser.add_argument("repo_dir", type=Path, help="Triton model repository to write into")
    parser.add_argument("--model-name", default=None, help="default: the card's name")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--max-queue-delay-us", type=int, default=2000, dest="max_queue_delay_microseconds"
    )
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"], default="KIND_GPU")
    args = parser.parse_args(argv)
    target = write_triton_repository(
        args.model_dir,
        args.repo_dir,
        max_batch_size=args.max_batch_size,
        max_queue_delay_microseconds=args.max_queue_delay_microseconds,
        instance_count=args.instance_count,
        kind=args.kind,
        model_name=args.model_name,
        version=args.version,
    )
    print(json.dumps({"triton_model": str(target), "config": str(target / "config.pbtxt")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
