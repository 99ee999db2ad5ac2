#!/usr/bin/env bash
# One prepared GPU check for the training side (issue 12): under 8 minutes on one H100/H200,
# one table at the end. Stages, each with its own time limit:
#   1. train_bench, ViT-B/16 @ 224, bf16, batch 128: eager            (torch + timm only)
#   2. the same with torch.compile                                     (torch + timm only)
#   3. 200 steps of the real trainer (cxr-triage train) on a synthetic uint8 cache, launched by
#      torchrun with one process, so the process group, the DDP wrap, compile after DDP, EMA,
#      GPU RandAugment, background checkpoints and base_lr scaling all run  (needs the project's
#      train extra: numpy, pandas, scikit-learn, scipy, pyyaml, tqdm, pydantic)
#   4. torch-side inference batch sweep, bf16, eager                   (torch + timm only)
#
#   bash benchmarks/gpu_check.sh                      # python3 from PATH, results in a temp dir
#   PYTHON=.venv/bin/python GPU_CHECK_OUT=/tmp/gc bash benchmarks/gpu_check.sh
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh    # tiny CPU dry run of the script itself
#
# A stage that fails or runs out of time is reported in the table with its exit status and log;
# the other stages still run. Nothing is downloaded (HF_HUB_OFFLINE=1, random init).
set -uo pipefail

PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu-check-XXXX)}
mkdir -p "$OUT"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
: > "$OUT/stages.jsonl"

if [[ "${GPU_CHECK_SMOKE:-0}" == 1 ]]; then
    DEV=cpu ARCH=vit-v1 SIZE=64 BS=8 STEPS=2 WARM=1 SWEEP=1,4 N_IMG=240 EPOCHS=2 MAXSTEP=3
    LIMITS=(120 240 240 60) AMP=off COMPILE_TRAIN=--no-compile WORKERS=0
else
    DEV=cuda ARCH=vit_base_patch16_224 SIZE=224 BS=128 STEPS=30 WARM=10
    SWEEP=1,8,32,64,128,256 N_IMG=4000 EPOCHS=10 MAXSTEP=20  # 10 x 20 = 200 optimiser steps
    LIMITS=(90 150 200 45) AMP=bf16 COMPILE_TRAIN=--compile WORKERS=4
fi

stage() {  # stage NAME LIMIT_S CMD...: stdout -> NAME.json, stderr -> NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "[gpu_check] $name (limit ${limit}s)" >&2
    timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"wall_s\": $(($(date +%s) - start)), \"limit_s\": $limit}" \
        >> "$OUT/stages.jsonl"
}

"$PY" - > "$OUT/env.json" 2> "$OUT/env.log" <<'EOF'
import json, torch, timm
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else "none"}))
EOF

BENCH=(benchmarks/train_bench.py --arch "$ARCH" --image-size "$SIZE" --device "$DEV"
       --batch-size "$BS" --steps "$STEPS" --warmup "$WARM" --skip-infer)
stage bench_eager "${LIMITS[0]}" "$PY" "${BENCH[@]}"
stage bench_compile "${LIMITS[1]}" "$PY" "${BENCH[@]}" --compile

if "$PY" -c "import numpy, pandas, sklearn, scipy, yaml, tqdm, pydantic" 2> "$OUT/trainer_deps.log"; then
    "$PY" - "$OUT/cache" "$SIZE" "$N_IMG" <<'EOF'
"""A synthetic cache in cxr-triage's format: random radiograph-sized uint8 images, 4 per patient."""
import csv, json, sys
from pathlib import Path
import numpy as np
from app.labels import NIH_LABELS
out, size, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
images = np.lib.format.open_memmap(out / "images.npy", "w+", np.uint8, (n, size, size))
for s in range(0, n, 500):
    images[s : s + 500] = rng.integers(0, 256, (min(500, n - s), size, size), dtype=np.uint8)
images.flush()
y = (rng.random((n, len(NIH_LABELS))) < 0.1).astype(int)
with (out / "index.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["row", "file", "patient_id", "official_split", *NIH_LABELS])
    for i in range(n):
        w.writerow([i, f"synthetic/{i:06d}.png", str(i // 4), "train_val", *y[i]])
meta = {"format": 1, "size": size, "interpolation": "bicubic", "labels": list(NIH_LABELS),
        "images": n, "failed": {}, "source": ""}
(out / "cache.json").write_text(json.dumps(meta))
EOF
    stage trainer_ddp1 "${LIMITS[2]}" "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node 1 -m training.cli train --arch "$ARCH" --cache "$OUT/cache" \
        --image-size "$SIZE" --device "$DEV" --split patient --epochs "$EPOCHS" \
        --max-steps-per-epoch "$MAXSTEP" --batch-size "$BS" --base-lr 2.5e-4 --layer-decay 0.55 \
        --drop-path-rate 0.2 --ema-decay 0.9998 --randaug-n 2 --randaug-m 6 --amp "$AMP" \
        "$COMPILE_TRAIN" --num-workers "$WORKERS" --checkpoint-every 5 --patience 0 \
        --warmup-epochs 1 --no-progress --no-tensorboard --out "$OUT/run"
else
    echo '{"stage": "trainer_ddp1", "rc": "skipped: the train extra is not installed (see trainer_deps.log)"}' \
        >> "$OUT/stages.jsonl"
fi

stage infer_sweep "${LIMITS[3]}" "$PY" benchmarks/train_bench.py --arch "$ARCH" \
    --image-size "$SIZE" --device "$DEV" --skip-train --steps "$STEPS" --warmup "$WARM" \
    --sweep "$SWEEP"

"$PY" - "$OUT" <<'EOF'
"""The one table: every figure below comes from the JSON/CSV files in the results folder."""
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])

def load(name):
    try:
        text = (out / name).read_text().strip()
        return json.loads(text[text.index("{"):]) if text else {}
    except (OSError, ValueError):
        return {}

env = load("env.json")
stages = {}
for line in (out / "stages.jsonl").read_text().splitlines():
    s = json.loads(line)
    stages[s["stage"]] = s
rows = []

def status(name):
    s = stages.get(name, {})
    rc = s.get("rc", "not run")
    wall = f", {s['wall_s']}s" if "wall_s" in s else ""
    return ("ok" if rc == 0 else f"FAILED rc={rc} (see {name}.log)" if isinstance(rc, int) else rc) + wall

for name, label in (("bench_eager", "train_bench eager"), ("bench_compile", "train_bench compile")):
    b = load(f"{name}.json")
    fig = (f"{b['train_img_s']:.0f} img/s" + (f", {b['train_tflop_s']:.0f} TFLOP/s" if "train_tflop_s" in b else "")
           + (f", {b['max_memory_gib']} GiB" if "max_memory_gib" in b else "")) if "train_img_s" in b else "-"
    rows.append((label, f"{b.get('arch', '-')} bs {b.get('batch_size', '-')} amp {b.get('amp_bf16', '-')}", fig, status(name)))

run = out / "run"
if (run / "run.json").is_file():
    r = json.loads((run / "run.json").read_text())
    with (run / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    later = epochs[1:] or epochs  # epoch 1 holds the compile
    img_s = sorted(float(e["train_img_s"]) for e in later)[len(later) // 2]
    data = sum(float(e["data_s"]) for e in later) / max(1e-9, sum(float(e["data_s"]) + float(e["compute_s"]) for e in later))
    fig = (f"{r['global_step']} steps, median {img_s:.0f} img/s after epoch 1, {data:.1%} waiting for data; "
           f"lr {r['lr']:.3g} = {r['base_lr']} x {r['global_batch']}/256; world {r['world_size']}")
    rows.append(("trainer torchrun x1", f"{r['arch']} bs {r['batch_size_per_process']}", fig, status("trainer_ddp1")))
else:
    rows.append(("trainer torchrun x1", "-", "-", status("trainer_ddp1")))

sweep = load("infer_sweep.json").get("infer_sweep", [])
for s in sweep:
    rows.append(("inference sweep", f"batch {s['batch']}", f"{s['img_s']:.0f} img/s, {s['ms_per_batch']} ms/batch", status("infer_sweep")))
if not sweep:
    rows.append(("inference sweep", "-", "-", status("infer_sweep")))

print(f"gpu_check on {env.get('gpu', '?')} (torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, CUDA {env.get('cuda', '?')}); files in {out}")
widths = [max(len(str(r[i])) for r in rows + [("check", "setting", "result", "status")]) for i in range(4)]
for r in [("check", "setting", "result", "status"), tuple("-" * w for w in widths), *rows]:
    print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
EOF
