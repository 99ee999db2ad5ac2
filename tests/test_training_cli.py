"""The training CLI's contracts: torch-free import, config precedence, committed configs valid."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig, add_config_flags, resolve_config

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_cli_loads_no_torch() -> None:
    code = (
        "import sys, training.cli; "
        "heavy = [m for m in ('torch', 'timm', 'sklearn', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return parser.parse_args(argv)


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("arch: vit-v1\nlr: 0.002\nimage-size: 96\naugment: false\n")
    cfg = resolve_config(_parse(["--config", str(cfg_file), "--lr", "0.01", "--augment"]))
    assert (cfg.arch, cfg.lr, cfg.image_size, cfg.augment) == ("vit-v1", 0.01, 96, True)
    assert cfg.epochs == TrainConfig().epochs
    base = {**TrainConfig().to_dict(), "epochs": 3, "arch": "cnn"}  # a saved run, on --resume
    resumed = resolve_config(_parse(["--epochs", "5"]), base=base)
    assert (resumed.arch, resumed.epochs) == ("cnn", 5)


def test_bad_config_values_are_refused(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config keys: learning_rate"):
        TrainConfig.load(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig.from_dict({"loss": "hinge"})
    with pytest.raises(SystemExit):
        _parse(["--sampler", "sometimes"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_configs_are_valid(path: Path) -> None:
    from training.zoo import REGISTRY

    cfg = TrainConfig.load(path)
    assert cfg.arch in REGISTRY or "_" in cfg.arch  # a zoo name or a timm name


def test_vit_b16_recipe_is_the_documented_one() -> None:
    cfg = TrainConfig.load(REPO / "configs" / "vit-b16-nih.yaml")
    assert cfg.arch == "vit_base_patch16_224" and cfg.pretrained
    assert cfg.image_size == 224 and cfg.interpolation == "bicubic" and cfg.amp == "bf16"
    assert cfg.split == "official" and cfg.layer_decay == 0.75 and cfg.aug_hflip == 0.0


def test_local_timm_checkpoint_loads_offline(tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    from training.zoo import create_model

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # a 1000-class file
    save_file(source.state_dict(), tmp_path / "vit_tiny.safetensors")
    model = create_model(
        "vit_tiny_patch16_224",
        num_classes=15,
        img_size=128,
        checkpoint=str(tmp_path / "vit_tiny.safetensors"),
    )
    assert torch.equal(model.blocks[5].attn.qkv.weight, source.blocks[5].attn.qkv.weight)
    assert model.head.weight.shape == (15, 192)  # classifier re-initialised for 15 labels
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 192)  # resampled from 14x14 to 8x8
