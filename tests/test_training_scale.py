"""Training at scale, on CPU with tiny models: the parts a multi-GPU run depends on.

Effective lr from the global batch in run.json, the --checkpoint load report and its floor, EMA
weights as best.pt, chest-safe augmentation, per-rank seeds and RNG states in a 2-process gloo
run, evaluate's patient-level CIs / calibration / subgroups, compare, and an fp16 export whose
card temperature the real service applies. Real shared NIH images (64 px), a few steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--arch",
    "vit-v1",
    "--image-size",
    "64",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
    "--split",
    "patient",
    "--val-fraction",
    "0.3",
    "--max-steps-per-epoch",
    "3",
    "--warmup-epochs",
    "0.3",
]


@pytest.fixture(scope="module")
def cache(nih_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px cache of 300 shared nih-64 images (with view/sex/age in the labels CSV)."""
    raw = pd.read_csv(nih_dir / "labels.csv")
    rows = raw[raw["subset"] == "nih-64"].head(300)
    base = tmp_path_factory.mktemp("scale")
    csv = base / "labels.csv"
    rows.to_csv(csv, index=False)
    out = base / "cache"
    args = ["cache", "--labels", str(csv), "--image-root", str(nih_dir), "--out", str(out)]
    assert main([*args, "--image-size", "64", "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with base_lr, layer decay, EMA, RandAugment and label smoothing."""
    out = tmp_path_factory.mktemp("runs") / "scale"
    args = ["train", "--cache", str(cache), "--out", str(out), *TINY, "--epochs", "1"]
    args += ["--batch-size", "16", "--base-lr", "4e-3", "--layer-decay", "0.8"]
    args += ["--ema-decay", "0.9", "--randaug-n", "2", "--label-smoothing", "0.1"]
    assert main(args) == 0
    return out


def test_run_json_records_the_effective_lr_and_global_batch(run: Path) -> None:
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_batch"] == 16 and summary["base_lr"] == 4e-3
    assert summary["lr"] == pytest.approx(4e-3 * 16 / 256)
    assert summary["augmentation"]["kind"] == "RandAugmentConfig"
    epoch = pd.read_csv(run / "metrics.csv").iloc[0]
    # with layer decay the head's lr is the peak one, not group 0's (the patch embedding's)
    assert epoch["lr"] > epoch["lr_min_group"]
    assert {"data_s", "compute_s"} <= set(epoch.index)


def test_ema_weights_are_validated_and_kept_as_best(run: Path) -> None:
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["ema"] is True
    assert all(torch.equal(best["model"][k], v) for k, v in last["ema"].items())
    assert any(not torch.equal(last["model"][k], v) for k, v in last["ema"].items())


def test_checkpoint_report_loads_a_run_and_refuses_mismatched_weights(
    run: Path, cache: Path, tmp_path: Path
) -> None:
    from training.checkpoint import CheckpointMismatch, load_checkpoint
    from training.zoo import create_model

    model = create_model("vit-v1", num_classes=3, img_size=64)  # another head size
    report = load_checkpoint(model, str(run / "best.pt"))
    assert report.fraction == 1.0 and not report.missing and not report.unexpected
    assert sorted(report.head_reinitialised) == ["head.bias", "head.weight"]

    # an MAE-style file whose keys carry a prefix: nothing matches, which timm would accept
    state = torch.load(run / "best.pt", weights_only=True)["model"]
    torch.save({f"encoder.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(CheckpointMismatch, match=r"only 0\.0% of the backbone"):
        load_checkpoint(
            create_model("vit-v1", num_classes=15, img_size=64), str(tmp_path / "prefixed.pth")
        )

    # a different architecture through the real command: exit 2 and nothing trained
    cnn = create_model("cnn", num_classes=15, img_size=64)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pth")
    out = tmp_path / "refused"
    args = ["train", "--cache", str(cache), "--out", str(out), *TINY, "--epochs", "1"]
    assert main([*args, "--checkpoint", str(tmp_path / "cnn.pth")]) == 2
    assert not (out / "last.pt").exists()

    # the floor is a setting: half the blocks loaded passes at 0.4, not at the default 0.95
    partial = {
        k: v
        for k, v in state.items()
        if not k.startswith(("blocks.4", "blocks.5", "blocks.6", "blocks.7"))
    }
    torch.save(partial, tmp_path / "partial.pth")
    low = load_checkpoint(
        create_model("vit-v1", num_classes=15, img_size=64),
        str(tmp_path / "partial.pth"),
        min_fraction=0.4,
    )
    assert 0.4 < low.fraction < 0.95 and any(k.startswith("blocks.7") for k in low.missing)
    with pytest.raises(CheckpointMismatch):
        load_checkpoint(
            create_model("vit-v1", num_classes=15, img_size=64), str(tmp_path / "partial.pth")
        )


def test_rand_augment_never_flips_vertically() -> None:
    from training.augment import RandAugmentConfig, rand_augment

    x = torch.zeros(64, 1, 32, 32)
    x[:, :, :12] = 1.0  # bright top, like the apices above a dark abdomen
    gen = torch.Generator().manual_seed(0)
    y = rand_augment(x, RandAugmentConfig(n=3, m=10.0, mstd=0.0), gen)
    top, bottom = y[:, :, :10].mean(dim=(1, 2, 3)), y[:, :, -10:].mean(dim=(1, 2, 3))
    assert (top > bottom).all()
    # horizontal flip is its own probability: a left-bright image ends right-bright at hflip=1
    side = torch.zeros(8, 1, 32, 32)
    side[..., :10] = 1.0
    flipped = rand_augment(side, RandAugmentConfig(n=1, m=0.0, mstd=0.0, hflip=1.0), gen)
    assert (flipped[..., -10:].mean(dim=(1, 2, 3)) > flipped[..., :10].mean(dim=(1, 2, 3))).all()


def test_evaluate_reports_patient_cis_calibration_and_subgroups(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            ["evaluate", "--run", str(run), "--split", "val", "--bootstrap", "40", "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "patient-level bootstrap" in printed and "calibration: temperature" in printed
    result = json.loads((run / "eval" / "val.json").read_text())
    m = result["metrics"]
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    val = splits[splits["split"] == "val"]
    assert m["bootstrap_unit"] == "patient" and m["n_patients"] == val["patient_id"].nunique()
    cal = result["calibration"]
    assert cal["fitted_on"] == "validation" and cal["temperature"] > 0
    # T minimises the validation NLL and T = 1 is a candidate: never worse than uncalibrated
    assert cal["nll_after"]["validation"] <= cal["nll_before"]["validation"] + 1e-6
    assert set(m["subgroups"]) <= {"view", "sex", "age_band"} and "view" in m["subgroups"]
    assert set(m["subgroups"]["view"]) <= {"PA", "AP"}
    thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
    assert thresholds["temperature"] == cal["temperature"]
    assert (run / "eval" / "val_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_a_run_with_itself_finds_no_difference(
    run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "cmp.json"
    args = ["compare", "--run", str(run), "--run", str(run), "--split", "val"]
    assert main([*args, "--bootstrap", "50", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["bootstrap_unit"] == "patient" and result["mean"]["difference"] == 0
    assert "A-B" in capsys.readouterr().out


def test_fp16_export_reports_flipped_decisions_and_the_service_uses_the_temperature(
    run: Path, tmp_path: Path, nih_dir: Path
) -> None:
    import onnx
    import onnxruntime as ort
    from fastapi.testclient import TestClient

    from app.card import ModelCard
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import to_model_input
    from app.main import create_app
    from app.settings import Settings
    from training.calibration import sigmoid

    out = tmp_path / "fp16"
    assert (
        main(
            [
                "export",
                "--run",
                str(run),
                "--out",
                str(out),
                "--fp16",
                "--bootstrap",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    card = ModelCard.load(out / "model_card.json")
    n_val = json.loads((run / "run.json").read_text())["splits"]["val"]["images"]
    assert card.export is not None and card.export.precision == "fp16"
    assert card.export.parity_images == n_val
    assert card.export.decisions_total == 2 * n_val * len(card.labels)
    assert set(card.export.decisions_changed) == {"screening", "diagnosis"}
    graph = onnx.load(str(out / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert card.calibration.method == "temperature" and card.calibration.temperature != 1.0
    assert set(card.calibration.ece_after) == {"validation", "test"}

    png = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[1].read_bytes()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = to_model_input(decode_image(png).pixels, card.input)
    logits = session.run(["logits"], {"pixel_values": x[None]})[0][0]
    settings = Settings(
        model_dir=out,
        intra_op_threads=1,
        decode_workers=1,
        audit_db=None,
        api_keys=None,
        log_json=False,
    )  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
    assert r.status_code == 200, r.text
    got = np.array([f["probability"] for f in r.json()["findings"]])
    assert got == pytest.approx(sigmoid(logits, card.calibration.temperature), abs=1e-5)


def test_ddp_two_ranks_get_their_own_seed_and_rng_state(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "training.cli", "train", "--cache", str(cache), "--out", str(out), *TINY]
    cmd += ["--epochs", "1", "--batch-size", "8", "--base-lr", "1e-3", "--arch", "vit-v2"]
    cmd += ["--seed", "5", "--no-checkpoint-async"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["seeds_per_rank"] == [5, 6]
    assert summary["global_batch"] == 16 and summary["lr"] == pytest.approx(1e-3 * 16 / 256)
    rng = torch.load(out / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2
    # vit-v2 draws dropout/drop-path masks from these streams: they must not be one stream
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def test_resume_from_an_older_last_pt_drops_later_log_rows(cache: Path, tmp_path: Path) -> None:
    """With last.pt every N epochs a crash can leave logs ahead of it; resume trims them."""
    import shutil

    out = tmp_path / "resume"
    args = ["train", "--cache", str(cache), "--out", str(out), *TINY, "--epochs", "3"]
    assert main([*args, "--stop-after-epoch", "1"]) == 0
    shutil.copy(out / "last.pt", tmp_path / "epoch1.pt")
    finish = ["--stop-after-epoch", "3"]  # the saved config would pause after every epoch
    assert main(["train", "--resume", "--out", str(out), "--no-progress", *finish]) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    shutil.copy(tmp_path / "epoch1.pt", out / "last.pt")  # as if epochs 2-3 had not been saved
    assert main(["train", "--resume", "--out", str(out), "--no-progress", *finish]) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    steps = pd.read_csv(out / "train_steps.csv")
    assert steps["step"].tolist() == list(range(1, 10))  # 3 epochs x 3 steps, none twice


def test_a_multi_process_run_refuses_to_build_the_cache(cache: Path, tmp_path: Path) -> None:
    """The decision is rank 0's, broadcast; building under torchrun would outlast the timeout."""
    import torch.distributed as dist

    from training import distributed as D
    from training.config import TrainConfig
    from training.trainer import prepare_cache

    labels = cache.parent / "labels.csv"
    cfg = TrainConfig(labels=str(labels), image_size=64, out=str(tmp_path))
    info = D.DistInfo(launched=True)  # what torchrun --nproc-per-node 1 gives
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="build it before torchrun"):
            prepare_cache(cfg, tmp_path, "bicubic", info)
        assert not (tmp_path / "cache").exists()
        cfg.cache = str(cache)  # an existing cache opens fine under the same process group
        assert prepare_cache(cfg, tmp_path, "bicubic", info).size == 64
    finally:
        dist.destroy_process_group()
