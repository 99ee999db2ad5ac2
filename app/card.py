"""The model card: the one document that passes from training to serving beside ``model.onnx``.

Training writes it, the service validates it at start-up (against the ONNX graph as well) and
serves it at ``GET /v1/model``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
ResizeMode = Literal["squash", "pad", "center_crop"]
HeatmapMethod = Literal["attention_rollout", "cam"]
# "per_image": output heatmap [N, h, w], one map explains every label; "per_label": [N, L, h, w],
# one map per card label (class activation maps of that label's classifier weights).
HeatmapShape = Literal["per_image", "per_label"]


class InputSpec(BaseModel):
    """How a decoded grayscale image becomes the model's ``pixel_values``."""

    height: int = Field(gt=0, examples=[224])
    width: int = Field(gt=0, examples=[224])
    mean: tuple[float, float, float] = Field(examples=[(0.5, 0.5, 0.5)])
    std: tuple[float, float, float] = Field(examples=[(0.5, 0.5, 0.5)])
    interpolation: Interpolation = "bicubic"
    resize: ResizeMode = Field(
        "squash",
        description="How an image whose aspect ratio differs from height:width reaches that "
        "size, as the model was trained: squash (stretch to fit; the bundled models, trained on "
        "square NIH images), pad (fit inside, black borders) or center_crop (fill, crop the "
        "centre)",
    )

    @model_validator(mode="after")
    def _positive_std(self) -> InputSpec:
        if any(s <= 0 for s in self.std):
            raise ValueError("input.std values must be > 0")
        return self


class Threshold(BaseModel):
    """A probability threshold with what it achieved on the data it was chosen on."""

    threshold: float = Field(ge=0.0, le=1.0)
    sensitivity: float | None = Field(default=None, ge=0.0, le=1.0)
    specificity: float | None = Field(default=None, ge=0.0, le=1.0)


class Thresholds(BaseModel):
    """Per-label operating points chosen on validation data.

    ``screening`` favours sensitivity (highest threshold whose sensitivity >= target),
    ``diagnosis`` balances both (Youden's J by default, or F1-max).
    """

    screening: dict[str, Threshold]
    diagnosis: dict[str, Threshold]
    screening_target_sensitivity: float = Field(default=0.95, gt=0.0, le=1.0)
    diagnosis_method: Literal["youden", "f1"] = "youden"
    chosen_on: str = "validation"


class LabelMetrics(BaseModel):
    auroc: float | None = Field(default=None, description="None when the label has one class only")
    auroc_ci_low: float | None = None
    auroc_ci_high: float | None = None
    positives: int = Field(ge=0)
    negatives: int = Field(ge=0)


class SubgroupMetrics(BaseModel):
    """AUROC within one level of a metadata attribute (view PA/AP, sex, age band)."""

    n_images: int = Field(ge=0)
    n_patients: int | None = None
    mean_auroc: float | None = None
    mean_auroc_ci_low: float | None = None
    mean_auroc_ci_high: float | None = None
    per_label: dict[str, float | None] = Field(default_factory=dict)


class SplitMetrics(BaseModel):
    n_images: int = Field(ge=0)
    n_patients: int | None = None
    mean_auroc: float | None = Field(
        default=None, description="Macro mean over the 14 pathologies that have both classes"
    )
    mean_auroc_ci_low: float | None = None
    mean_auroc_ci_high: float | None = None
    bootstrap_unit: Literal["patient", "image"] | None = Field(
        default=None, description="What the CI's bootstrap resampled (None: older cards)"
    )
    per_label: dict[str, LabelMetrics] = Field(default_factory=dict)
    subgroups: dict[str, dict[str, SubgroupMetrics]] = Field(
        default_factory=dict, description="attribute (view, sex, age_band) -> level -> AUROC"
    )


class Calibration(BaseModel):
    """Temperature scaling: the service computes sigmoid(logit / temperature).

    Thresholds are on these calibrated probabilities. The default (1.0, method none) is the
    plain sigmoid, so cards written before calibration existed mean what they always meant.
    """

    method: Literal["none", "temperature"] = "none"
    temperature: float = Field(default=1.0, gt=0.0)
    fitted_on: str | None = None
    ece_bins: int | None = None
    ece_before: dict[str, float] = Field(default_factory=dict, description="split -> ECE, T = 1")
    ece_after: dict[str, float] = Field(default_factory=dict, description="split -> ECE with T")


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: str = "NIH ChestX-ray14"
    split: str | None = None
    image_counts: dict[str, int] = Field(default_factory=dict)
    epochs: int | None = None
    seed: int | None = None
    commit: str | None = None


class Localisation(BaseModel):
    """How often a finding's heatmap maximum falls inside a radiologist's box (pointing game)."""

    model_config = ConfigDict(extra="allow")

    benchmark: str
    model: str = Field(description="Which model drew the maps (e.g. out-of-fold fold models)")
    boxes: int = Field(ge=0)
    images: int = Field(ge=0)
    hits: int = Field(ge=0)
    hit_rate: float | None = None
    hit_rate_ci95: tuple[float, float] | None = None
    random_point_hit_rate: float | None = None
    centre_point_hit_rate: float | None = None
    command: str | None = None


class QuantizationInfo(BaseModel):
    """An int8 graph made from a float32 one (``training/quantize.py``) and what it cost.

    Speeds are medians of alternating runs of both graphs on the exporting machine's CPU (ONNX
    Runtime, the service's session options); AUROC is the macro mean over the pathologies with
    both classes among the validation images, scored by each graph at the same thresholds.
    """

    method: Literal["dynamic", "static"]
    source: str = Field(description="The float32 model it was made from")
    calibration_images: int = 0
    cpu_threads: int
    batch1_ms_fp32: float
    batch1_ms_int8: float
    batch1_cpu_ms_fp32: float | None = None
    batch1_cpu_ms_int8: float | None = None
    batch8_img_s_fp32: float | None = None
    batch8_img_s_int8: float | None = None
    speedup_batch1: float
    speedup_batch8: float | None = None
    validation_images: int | None = None
    mean_auroc_fp32: float | None = None
    mean_auroc_int8: float | None = None
    mean_auroc_delta: float | None = None
    auroc_delta: dict[str, float] = Field(default_factory=dict, description="label -> int8 - fp32")
    mean_abs_dprob: float | None = Field(
        None, description="mean |int8 - fp32| probability over the validation images and labels"
    )
    fp32_prob_spread: float | None = Field(
        None,
        description="median over labels of the fp32 probabilities' std across images: what "
        "mean_abs_dprob is small against (a near-constant model makes AUROC changes noise)",
    )
    prob_correlation: float | None = Field(
        None, description="mean over labels of the fp32-int8 probability correlation"
    )
    command: str | None = None


class ExportInfo(BaseModel):
    """Numeric precision of the graph and how far it is from the float32 torch model.

    ``decisions_changed`` counts (image, label, screening|diagnosis) flags that flip against the
    float32 model on the validation images, at this card's thresholds and temperature.
    """

    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    parity_images: int | None = None
    max_abs_dprob: float | None = None
    decisions_total: int | None = None
    decisions_changed: dict[str, int] = Field(default_factory=dict)
    quantization: QuantizationInfo | None = None


class ModelCard(BaseModel):
    """``model_card.json``; see DESIGN.md, "Model folder"."""

    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(examples=["default"])
    version: str = Field(examples=["0.1.0"])
    created: datetime
    architecture: str = Field(examples=["vit-v1"])
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    labels: list[str] = Field(min_length=1)
    input: InputSpec
    heatmap_method: HeatmapMethod = "attention_rollout"
    heatmap_shape: HeatmapShape = "per_image"
    thresholds: Thresholds
    calibration: Calibration = Field(default_factory=Calibration)
    metrics: dict[str, SplitMetrics] = Field(default_factory=dict)
    training: TrainingInfo = Field(default_factory=TrainingInfo)
    export: ExportInfo | None = None
    localisation: Localisation | None = None
    intended_use: str = ""
    limitations: str = ""

    @model_validator(mode="after")
    def _thresholds_cover_labels(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        for kind in ("screening", "diagnosis"):
            table: dict[str, Threshold] = getattr(self.thresholds, kind)
            missing = [lbl for lbl in self.labels if lbl not in table]
            unknown = [lbl for lbl in table if lbl not in self.labels]
            if missing or unknown:
                raise ValueError(
                    f"thresholds.{kind} must name exactly the card's labels "
                    f"(missing: {missing}, unknown: {unknown})"
                )
        return self

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
