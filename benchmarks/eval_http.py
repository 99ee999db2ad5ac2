"""Mean AUROC of a served model, measured through HTTP: the path a user's images take.

Training evaluates on its uint8 cache; a user's image goes through ``POST /predict`` (the app's
decoder and resizer, ONNX Runtime, the card's labels). This script posts every image of a labelled
set to a real ``cxr-triage serve`` process (started here on a free port, or ``--url``) and scores
the returned probabilities with the training package's metrics (per-label AUROC with
patient-level bootstrap 95% CIs, macro mean over the 14 pathologies), then says whether the mean
falls inside the model card's validation CI.

    # the held-out test patients of the run that produced models/default
    .venv/bin/python benchmarks/eval_http.py --model-dir models/default \\
        --labels ../shared/data/nih/labels.csv --splits runs/demo/splits.csv --split test
    # any labelled CSV (file column + NIH labels), against a running service
    .venv/bin/python benchmarks/eval_http.py --url http://127.0.0.1:8000 --labels my.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.labels import NIH_LABELS  # noqa: E402
from training.data import read_labels  # noqa: E402
from training.metrics import auroc_table  # noqa: E402

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def select_rows(table: pd.DataFrame, splits_csv: Path | None, split: str) -> pd.DataFrame:
    """The rows of ``table`` that a run's ``splits.csv`` put in ``split`` (all rows without one)."""
    if splits_csv is None:
        return table
    splits = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    wanted = set(splits.loc[splits["split"] == split, "file"])
    rows = table[table["file"].isin(wanted)]
    if len(rows) != len(wanted):
        raise SystemExit(
            f"{len(wanted) - len(rows)} {split} files of {splits_csv} are not in the labels CSV"
        )
    return rows


def predict_all(url: str, files: list[str], *, concurrency: int, api_key: str | None) -> np.ndarray:
    """Probabilities [N, L] in the service's label order (checked against NIH_LABELS)."""
    headers = {"X-API-Key": api_key} if api_key else {}

    def one(path: str) -> list[float]:
        body = Path(path).read_bytes()
        ctype = CONTENT_TYPES.get(Path(path).suffix.lower(), "application/dicom")
        for attempt in range(5):
            r = client.post(
                f"{url}/predict", content=body, headers={**headers, "Content-Type": ctype}
            )
            if r.status_code != 503:
                break
            time.sleep(float(r.headers.get("Retry-After", 1)) * (attempt + 1))
        r.raise_for_status()
        findings = r.json()["findings"]
        if [f["label"] for f in findings] != list(NIH_LABELS):
            raise SystemExit(f"the model's labels are not NIH_LABELS: {findings}")
        return [f["probability"] for f in findings]

    with (
        httpx.Client(timeout=60.0) as client,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        return np.array(list(pool.map(one, files)), dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", type=Path, help="start `cxr-triage serve` on this folder")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV (file + NIH labels)")
    p.add_argument("--image-root", type=Path, help="folder the CSV's paths are relative to")
    p.add_argument("--splits", type=Path, help="a run's splits.csv: score only --split's images")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CI")
    p.add_argument("--api-key", help="X-API-Key for a service with keys configured")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    table = read_labels(args.labels, image_root=args.image_root)
    rows = select_rows(table, args.splits, args.split)
    files = rows["file"].tolist()
    targets = rows[list(NIH_LABELS)].to_numpy(dtype=np.float64)
    what = f"{args.split} split of {args.splits}" if args.splits else str(args.labels)
    print(f"{len(files)} images ({rows['patient_id'].nunique()} patients) from the {what}")

    server = None
    url = args.url
    tmp = tempfile.TemporaryDirectory(prefix="eval-http-")
    try:
        if args.model_dir is not None:
            from tests.live_server import start_server

            server = start_server(
                args.model_dir.resolve(), Path(tmp.name), env={"CXR_INTRA_OP_THREADS": "2"}
            )
            url = server.url
        card = httpx.get(f"{url}/v1/model", headers={"X-API-Key": args.api_key or ""}).json()
        start = time.perf_counter()
        probs = predict_all(url, files, concurrency=args.concurrency, api_key=args.api_key)
        elapsed = time.perf_counter() - start
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()

    table_out = auroc_table(
        targets,
        probs,
        list(NIH_LABELS),
        n_boot=args.bootstrap,
        groups=rows["patient_id"].astype(str).to_numpy(),  # patient-level CI, like evaluate
    )
    print(f"scored {len(files)} images over HTTP in {elapsed:.1f} s")
    print(f"{'label':<19}{'pos':>5} {'AUROC':>6}  95% CI")
    for name, e in table_out["per_label"].items():
        auc = "  -  " if e["auroc"] is None else f"{e['auroc']:.3f}"
        ci = (
            "" if e["auroc_ci_low"] is None else f"{e['auroc_ci_low']:.3f}-{e['auroc_ci_high']:.3f}"
        )
        print(f"{name:<19}{e['positives']:>5} {auc:>6}  {ci}")
    mean = table_out["mean_auroc"]
    lo, hi = table_out["mean_auroc_ci_low"], table_out["mean_auroc_ci_high"]
    print(
        f"mean AUROC over {len(table_out['mean_over'])} pathologies (HTTP): {mean:.4f} "
        f"(95% CI {lo:.4f}-{hi:.4f})"
    )
    val = card.get("metrics", {}).get("validation", {})
    v_lo, v_hi = val.get("mean_auroc_ci_low"), val.get("mean_auroc_ci_high")
    if v_lo is not None and v_hi is not None:
        inside = v_lo <= mean <= v_hi
        print(
            f"model card {card['name']} {card['version']}: validation mean AUROC "
            f"{val['mean_auroc']:.4f} (95% CI {v_lo:.4f}-{v_hi:.4f}); this figure is "
            f"{'inside' if inside else 'OUTSIDE'} it"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"images": len(files), "source": what, "model": card.get("name"),
                 "version": card.get("version"), "metrics": table_out},
                indent=2,
            ) + "\n"
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
