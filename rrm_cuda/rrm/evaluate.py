"""Evaluate predicted masks: mIoU over 21 classes (ignore 255), per-class IoU table, confusion matrix
saved as CSV and PNG.

``python python/eval_rrm.py --pred preds --out eval`` (the data recorded by ``rrm-infer`` in
``preds/dataset.json``, or ``--data embedded --split val ...``) or, to predict first,
``python python/eval_rrm.py --checkpoint runs/rrm-cpu-demo/model_final.pt --out eval [--crf]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._deps import positive_int, require
from .data import AugmentedDataset, build_dataset
from .metrics import VOC_CLASSES, confusion_matrix, iou_from_confusion, mean_iou, pixel_accuracy


def evaluate_predictions(pred_dir: str | Path, dataset: AugmentedDataset, limit: int | None = None) -> np.ndarray:
    """Accumulate the 21×21 confusion matrix of ``<pred_dir>/<name>.png`` against the dataset's
    ground truth (evaluation mode: whole images). A missing prediction raises FileNotFoundError
    naming it."""
    from PIL import Image  # (the rrm extra: .data has checked it)

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    conf = np.zeros((21, 21), np.int64)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        s = dataset[i]
        path = pred_dir / f"{s['name']}.png"
        if not path.is_file():
            raise FileNotFoundError(f"prediction not found: {path}")
        with Image.open(path) as im:
            pred = np.asarray(im)
        gt = s["mask"].numpy()
        if pred.shape != gt.shape:
            raise ValueError(f"{path} has shape {pred.shape}; ground truth {gt.shape}")
        conf += confusion_matrix(pred, gt)
    return conf


def iou_table(conf: np.ndarray) -> str:
    """Text table: per-class IoU (percent; '-' for a class absent from prediction and ground truth),
    mIoU and pixel accuracy."""
    iou = iou_from_confusion(conf)
    lines = [f"{'class':<14s}{'IoU':>8s}"]
    lines += [
        f"{VOC_CLASSES[c]:<14s}{(f'{100 * v:8.2f}' if np.isfinite(v) else '       -')}" for c, v in enumerate(iou)
    ]
    lines.append(f"{'mIoU':<14s}{100 * mean_iou(conf):8.2f}")
    lines.append(f"{'pixel acc.':<14s}{100 * pixel_accuracy(conf):8.2f}")
    return "\n".join(lines)


def save_confusion(conf: np.ndarray, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``confusion.csv`` (rows: ground truth, columns: prediction, pixel counts) and
    ``confusion.png`` (row-normalised). Returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "confusion.csv", out / "confusion.png"
    header = "gt\\pred," + ",".join(VOC_CLASSES)
    rows = [f"{VOC_CLASSES[i]}," + ",".join(str(int(v)) for v in conf[i]) for i in range(conf.shape[0])]
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(21), VOC_CLASSES, rotation=90, fontsize=7)
    ax.set_yticks(range(21), VOC_CLASSES, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"confusion (row-normalised), mIoU {100 * mean_iou(conf):.2f}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return csv_path, png_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrm-eval", description="mIoU of predicted masks (21 classes, ignore 255)")
    p.add_argument("--pred", default=None, help="folder of <name>.png predictions")
    p.add_argument("--checkpoint", default=None, help="predict with this checkpoint first (into <out>/pred)")
    where = "the checkpoint's, or with --pred as recorded in <pred>/dataset.json by rrm-infer"
    p.add_argument("--data", default=None, help=f"'embedded' or a VOC2012 folder (default: {where}; else embedded)")
    p.add_argument("--split", default=None, help=f"split or list file (default: {where}; else val)")
    p.add_argument("--length", type=int, default=None, help=f"embedded data: number of images (default: {where})")
    p.add_argument("--image-size", type=int, default=None, help=f"embedded image side (default: {where}; else 96)")
    p.add_argument("--seed", type=int, default=None, help=f"embedded data: scene seed (default: {where}; else 0)")
    p.add_argument("--out", required=True, help="folder for confusion.csv / confusion.png")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    p.add_argument("--device", default="auto")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if (a.pred is None) == (a.checkpoint is None):
        raise SystemExit("give exactly one of --pred (existing masks) and --checkpoint (predict first)")
    require("matplotlib")  # the confusion chart
    if a.checkpoint is not None:  # predict first: the checkpoint's data, with the flags
        from .infer import run_from_args

        pred = str(Path(a.out) / "pred")
        run_from_args(a, pred)
        spec = json.loads((Path(pred) / "dataset.json").read_text())
    else:  # what rrm-infer recorded beside the masks (else the embedded defaults), with the flags
        pred = a.pred
        spec = {"data": "embedded", "split": "val", "length": None, "image_size": 96, "seed": 0}
        recorded = Path(pred) / "dataset.json"
        if recorded.is_file():
            spec.update(json.loads(recorded.read_text()))
        flags = {"data": a.data, "split": a.split, "length": a.length, "image_size": a.image_size, "seed": a.seed}
        spec.update({k: v for k, v in flags.items() if v is not None})
    size = spec["image_size"]
    dataset = build_dataset(spec["data"], spec["split"], None, spec["seed"], spec["length"], (size, size))
    conf = evaluate_predictions(pred, dataset, a.limit)
    print(iou_table(conf))
    csv_path, png_path = save_confusion(conf, a.out)
    print(f"confusion matrix: {csv_path}, {png_path}")
    return 0
