"""Training configuration: one dataclass, filled from defaults < YAML file < command-line flags.

The dataclass is the single list of knobs: the ``train`` sub-command's flags are generated from its
fields (``--image-size`` for ``image_size``) so the YAML keys and the flags can never drift apart.
Torch-free, because the CLI builds its parser from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

LossName = Literal["bce", "wbce", "focal", "asl"]
SamplerName = Literal["none", "label_count", "effective"]
SplitMode = Literal["official", "patient"]
AmpMode = Literal["auto", "bf16", "off"]


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of ``cxr-triage train``; YAML keys are these field names."""

    # data
    labels: str | None = _f(
        None, "labels CSV: Data_Entry_2017_v2020.csv or any CSV with a file column"
    )
    image_root: str | None = _f(None, "folder the CSV's image paths are relative to")
    official_lists: str | None = _f(
        None, "folder with train_val_list.txt/test_list.txt (default: beside the CSV)"
    )
    cache: str | None = _f(
        None, "uint8 image cache folder (built here if missing; default RUN/cache)"
    )
    cache_workers: int | None = _f(None, "processes decoding images when building the cache")
    image_size: int = _f(224, "model input height and width; the cache is built at this size")
    interpolation: str | None = _f(None, "resize filter (default: the model's data config)")
    split: SplitMode = field(
        default="official",
        metadata={
            "help": "official: NIH test list + patient-wise val carve; patient: seeded carve"
        },
    )
    val_fraction: float = _f(0.1, "fraction of train_val patients held out for validation")
    test_fraction: float = _f(0.2, "fraction of patients held out for test (split=patient only)")
    # model
    arch: str = _f("vit_base_patch16_224", "zoo name (vit-v1, vit-v2, cnn, resnet34) or timm name")
    pretrained: bool = _f(False, "load the timm pretrained weights (needs the hub or its cache)")
    checkpoint: str | None = _f(None, "local weights (.safetensors/.pth/.pt) to start from")
    drop_rate: float | None = _f(None, "head/MLP dropout (default: the zoo's)")
    drop_path_rate: float | None = _f(None, "stochastic depth (default: the zoo's)")
    model_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": 'extra timm.create_model options (JSON), e.g. {"global_pool": "avg"}'},
    )
    checkpoint_min_loaded: float = _f(
        0.95, "fail unless this fraction of the backbone's parameters loaded from --checkpoint"
    )
    mean: list[float] | None = field(
        default=None, metadata={"help": "input mean (1 or 3 values; default: the model's)"}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "input std (1 or 3 values; default: the model's)"}
    )
    # optimisation
    epochs: int = _f(10, "epochs to train")
    batch_size: int = _f(32, "images per step per process")
    lr: float = _f(1e-4, "peak AdamW learning rate (after warm-up); ignored when base_lr is set")
    base_lr: float | None = _f(
        None, "lr per 256 images: peak lr = base_lr x global batch (batch x processes) / 256"
    )
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine")
    warmup_epochs: float = _f(1.0, "linear warm-up length in epochs (fractions allowed)")
    weight_decay: float | None = _f(None, "AdamW weight decay (default: the zoo's, else 0.05)")
    layer_decay: float | None = _f(None, "layer-wise LR decay, e.g. 0.75 (off when unset)")
    grad_clip: float | None = _f(1.0, "clip the gradient norm to this (off when unset)")
    loss: LossName = field(
        default="bce", metadata={"help": "bce | wbce (pos_weight) | focal | asl (asymmetric)"}
    )
    pos_weight_max: float = _f(50.0, "cap on wbce's negatives/positives ratio")
    focal_gamma: float = _f(2.0, "focal loss gamma")
    focal_alpha: float = _f(-1.0, "focal loss alpha (negative: off)")
    asl_gamma_neg: float = _f(4.0, "asymmetric loss gamma for negatives")
    asl_gamma_pos: float = _f(0.0, "asymmetric loss gamma for positives")
    asl_clip: float = _f(0.05, "asymmetric loss probability margin for negatives")
    sampler: SamplerName = field(
        default="none", metadata={"help": "none | label_count | effective (class-balanced)"}
    )
    sampler_beta: float = _f(0.999, "beta of the effective-number class weights")
    label_smoothing: float = _f(0.0, "multi-label smoothing: targets y(1-e) + e/2 (0: off)")
    ema_decay: float | None = _f(
        None, "keep an EMA of the weights (e.g. 0.9998); it is validated and saved as best"
    )
    # augmentation (chest-safe: no vertical flip, small geometry)
    augment: bool = _f(True, "random affine/intensity augmentation of training images")
    aug_rotate: float = _f(7.0, "max rotation in degrees")
    aug_translate: float = _f(0.05, "max shift as a fraction of the side")
    aug_scale: float = _f(0.1, "max zoom in or out as a fraction")
    aug_hflip: float = _f(0.0, "probability of a horizontal flip (off: the heart is on the left)")
    aug_brightness: float = _f(0.1, "max brightness shift (fraction of the range)")
    aug_contrast: float = _f(0.1, "max contrast change (fraction)")
    randaug_n: int = _f(0, "chest-safe RandAugment: ops per image on the GPU (0: off)")
    randaug_m: float = _f(9.0, "RandAugment magnitude, 0-10 (timm's scale)")
    randaug_mstd: float = _f(0.5, "std of the per-image magnitude noise (timm's mstd)")
    # run
    out: str | None = _f(None, "run folder (checkpoints, metrics, splits)")
    seed: int = _f(0, "seed for splits, init, sampling and augmentation")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    amp: AmpMode = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA, off on CPU) | bf16 | off"}
    )
    compile: bool = _f(False, "torch.compile the model (GPU throughput)")
    channels_last: bool | None = _f(
        None, "channels-last memory format (default: on for CNNs, ~30% faster on CPU)"
    )
    num_workers: int | None = _f(None, "DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    threads: int | None = _f(None, "torch CPU threads (default: all cores)")
    eval_batch_size: int | None = _f(None, "validation batch size (default: 2 x batch size)")
    patience: int = _f(5, "early stopping: epochs without a better val mean AUROC (0: off)")
    max_steps_per_epoch: int | None = _f(None, "cap on steps per epoch (smoke runs)")
    stop_after_epoch: int | None = _f(
        None, "end this invocation after this epoch, to --resume later (time-sliced jobs)"
    )
    checkpoint_every: int = _f(1, "write last.pt every N epochs (and always at the end)")
    checkpoint_async: bool = _f(True, "write checkpoints in a background thread")
    tensorboard: bool = _f(True, "also log to TensorBoard when it is installed")
    progress: bool = _f(True, "tqdm progress bars")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(_yaml(path))

    def validate(self) -> None:
        """Check the Literal-typed fields, which YAML cannot type-check for us."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = _literal_choices(hints[f.name])
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, not {value!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.image_size < 8:
            raise ValueError("image_size must be at least 8")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, int | float):
                    value = [value]
                value = [float(v) for v in value]
                if len(value) == 1:
                    value = value * 3
                if len(value) != 3:
                    raise ValueError(f"{name} takes 1 or 3 values, not {len(value)}")
                setattr(self, name, value)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std values must be > 0")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ValueError("model_kwargs must be a mapping of timm.create_model options")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in (0, 1)")
        if not 0.0 < self.checkpoint_min_loaded <= 1.0:
            raise ValueError("checkpoint_min_loaded must be in (0, 1]")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if self.randaug_n < 0 or not 0.0 <= self.randaug_m <= 10.0:
            raise ValueError("randaug_n must be >= 0 and randaug_m in [0, 10]")


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    if get_origin(tp) is Literal:
        return get_args(tp)
    return ()


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; Literal -> the type of its values."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0]
    if get_origin(tp) is Literal:
        return type(get_args(tp)[0])
    return tp


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` flag per field; defaults are SUPPRESSed so only given flags override."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = "" if f.default is None else f" (default: {f.default})"
        kwargs["help"] = f.metadata.get("help", "") + default
        base = _base_type(tp)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs.update(type=float, nargs="+", metavar="V")
        elif get_origin(base) is dict:
            kwargs.update(type=_json_mapping, metavar="JSON")
        else:
            kwargs["type"] = _base_type(tp)
            choices = _literal_choices(tp)
            if not choices and get_origin(tp) in (typing.Union, types.UnionType):
                choices = next(
                    (_literal_choices(a) for a in get_args(tp) if _literal_choices(a)), ()
                )
            if choices:
                kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)


def _json_mapping(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. {"global_pool": "avg"}')
    return value


def resolve_config(args: argparse.Namespace, *, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``base`` (a saved run's config) < ``--config`` YAML < flags given."""
    data: dict[str, Any] = dict(base or {})
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(_yaml(config_path))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(data)


def _yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a YAML mapping of key: value")
    return {k.replace("-", "_"): v for k, v in data.items()}
