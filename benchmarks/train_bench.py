"""Training and inference throughput of a zoo/timm model on synthetic tensors (default ViT-B/16).

Measures what the trainer does per step (bf16 autocast on CUDA, forward, BCE loss, backward,
gradient clipping, fused AdamW) and a torch inference forward, in images/s, after warm-up steps.
Synthetic inputs isolate the model from data loading; `cxr-triage train` reports the end-to-end
figure per epoch (metrics.csv, train_img_s).

    python benchmarks/train_bench.py --device cuda                 # ViT-B/16 @ 224, batch 128
    python benchmarks/train_bench.py --device cuda --compile        # + torch.compile
    python benchmarks/train_bench.py --device cpu --steps 2 --batch-size 4
    python benchmarks/train_bench.py --arch vit-v1 --image-size 128 --device cpu --threads 1
    python benchmarks/train_bench.py --skip-train --sweep 1,8,32,64,128,256   # inference sweep

timm model names need only torch and timm (benchmarks/gpu_check.sh relies on that); zoo names
(vit-v1, cnn, ...) import the project's training package.

ViT-B/16 costs about 35 GFLOP per image forward and 105 with backward; the printed MFU-style
figure uses those counts only for ViT-B/16 at 224 px.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from timm.optim import create_optimizer_v2

VIT_B16_GFLOP_FWD = 35.1


def build(arch: str, image_size: int) -> torch.nn.Module:
    """timm models straight from timm (torch + timm only); zoo names through training.zoo."""
    import timm

    if timm.is_model(arch):
        try:
            return timm.create_model(arch, num_classes=15, img_size=image_size)
        except TypeError:
            return timm.create_model(arch, num_classes=15)
    from training.zoo import create_model

    return create_model(arch, num_classes=15, img_size=image_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bench_train(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    model.train()
    opt = create_optimizer_v2(
        model,
        opt="adamw",
        lr=1e-4,
        weight_decay=0.05,
        fused=True if device.type == "cuda" else None,
    )
    net = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(args.batch_size, 15, device=device) < 0.1).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        with _autocast(device, args.amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - start)


def bench_infer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    model.eval()
    net = torch.compile(model) if args.compile else model
    x = torch.randn(args.infer_batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode(), _autocast(device, args.amp):
        for _ in range(args.warmup):
            net(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            net(x)
        _sync(device)
    return args.infer_batch_size * args.steps / (time.perf_counter() - start)


def bench_sweep(
    model: torch.nn.Module, args: argparse.Namespace, device: torch.device
) -> list[dict[str, float]]:
    """Inference img/s and ms per batch at each batch size of ``--sweep`` (torch side)."""
    rows = []
    for bs in [int(v) for v in args.sweep.split(",")]:
        args.infer_batch_size = bs
        img_s = bench_infer(model, args, device)
        rows.append(
            {"batch": bs, "img_s": round(img_s, 1), "ms_per_batch": round(1e3 * bs / img_s, 2)}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_base_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument("--infer-batch-size", type=int, default=None, help="default: --batch-size x2")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10 / 1)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off for CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--sweep", default=None, help="inference batch sizes, e.g. 1,8,32,128")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (128 if cuda else 8)
    args.infer_batch_size = args.infer_batch_size or 2 * args.batch_size
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.amp = cuda if args.amp is None else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    model = build(args.arch, args.image_size).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    result: dict[str, object] = {
        "arch": args.arch,
        "image_size": args.image_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
        "amp_bf16": args.amp,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "torch": torch.__version__,
    }
    if not args.skip_train:
        result["train_img_s"] = round(bench_train(model, args, device), 2)
    if not args.skip_infer:
        result["infer_batch_size"] = args.infer_batch_size
        result["infer_img_s"] = round(bench_infer(model, args, device), 2)
    if args.sweep:
        result["infer_sweep"] = bench_sweep(model, args, device)
    if args.arch == "vit_base_patch16_224" and args.image_size == 224 and "train_img_s" in result:
        result["train_tflop_s"] = round(result["train_img_s"] * 3 * VIT_B16_GFLOP_FWD / 1e3, 3)
    if cuda:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
