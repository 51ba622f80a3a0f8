"""RRM inference: single- or multi-scale segmentation, optional dense-CRF post-processing, masks
written as VOC-palette PNGs.

``python python/infer_rrm.py --checkpoint runs/rrm-cpu-demo/model_final.pt --out preds [--crf]``
(data and split default to the checkpoint's validation data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import dense_crf
from ._deps import positive_int
from .data import build_dataset, save_mask_png
from .model import RRM, load_state_file
from .train import TrainConfig, build_model, config_from_dict, resolve_device

# SPEC §5 inference CRF (RRM's infer script): Gaussian sxy 3 compat 3; bilateral sxy 83 srgb 5 compat 4.
INFER_CRF = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=83.0, bilateral_srgb=5.0, bilateral_compat=4.0)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[RRM, TrainConfig]:
    """Model (eval mode, on ``device``) and training config from a ``model_final.pt`` or
    ``checkpoint.pt`` written by :func:`rrm_cuda.rrm.train.train`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_state_file(path)
    cfg = config_from_dict(state["config"])
    model = build_model(dataclasses.replace(cfg, pretrained=None))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict_probs(model: RRM, image: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Segmentation probabilities averaged over ``scales`` (and horizontal flips if ``flip``).

    Args:
        image: (B, 3, H, W) normalised images.

    Returns:
        (B, 21, H, W) float32 softmax probabilities at the input resolution.
    """
    H, W = image.shape[2:]
    total = image.new_zeros(image.shape[0], 21, H, W, dtype=torch.float32)
    n = 0
    for s in scales:
        x = (
            image
            if float(s) == 1.0
            else F.interpolate(
                image,
                scale_factor=float(s),
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        )
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(3) if flipped else x
            seg = F.interpolate(model(xi).seg.float(), (H, W), mode="bilinear", align_corners=False)
            total += torch.softmax(seg.flip(3) if flipped else seg, 1)
            n += 1
    return total / n


def crf_refine(probs: Tensor, raw: Tensor, iterations: int = 10) -> Tensor:
    """Dense-CRF post-processing with SPEC's inference settings: probs (B, 21, H, W), raw (B, 3, H, W)
    0–255 -> refined probabilities (B, 21, H, W)."""
    return dense_crf(probs=probs, image=raw.float(), iterations=iterations, **INFER_CRF)


def run_inference(
    checkpoint: str | Path,
    out_dir: str | Path,
    data: str | None = None,
    split: str | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: bool = False,
    limit: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    length: int | None = None,
    image_size: int | None = None,
) -> list[str]:
    """Predict every image of a dataset split and write ``<out_dir>/<name>.png`` (VOC palette), and
    ``<out_dir>/dataset.json``: the data they were predicted for (``rrm-eval --pred`` reads it).
    ``seed``, ``length``, ``image_size`` (the embedded data's; None: the checkpoint's) as ``data``
    and ``split`` choose the images. Ground truth is not needed (a VOC split without masks, such as
    test, works). Returns the names written."""
    dev = resolve_device(device)
    model, cfg = load_checkpoint(checkpoint, dev)
    spec = dataset_spec(cfg, data, split, seed, length, image_size)
    dataset = build_dataset(
        spec["data"],
        spec["split"],
        None,
        spec["seed"],
        spec["length"],
        (spec["image_size"], spec["image_size"]),
        cfg.cls_labels,
        masks=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(spec, indent=1) + "\n")
    names = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        s = dataset[i]
        probs = predict_probs(model, s["image"][None].to(dev), scales, flip)
        if crf:
            probs = crf_refine(probs, s["raw"][None].to(dev))
        save_mask_png(probs.argmax(1)[0].cpu().numpy(), out / f"{s['name']}.png")
        names.append(s["name"])
    return names


def dataset_spec(
    cfg: TrainConfig,
    data: str | None = None,
    split: str | None = None,
    seed: int | None = None,
    length: int | None = None,
    image_size: int | None = None,
) -> dict:
    """The evaluation data of a training run (its ``data``, ``val_split``, ``seed``, ``val_length``,
    ``image_size``), each overridden where given: what inference predicts and evaluation scores."""
    data = data or cfg.data
    embedded = data == "embedded"
    return {
        "data": data,
        "split": split or cfg.val_split,
        "seed": cfg.seed if seed is None else seed,
        "length": (length or cfg.val_length) if embedded else None,
        "image_size": image_size or cfg.image_size,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rrm-infer", description="RRM inference: masks as VOC-palette PNGs")
    p.add_argument("--checkpoint", required=True, help="model_final.pt or checkpoint.pt of a training run")
    p.add_argument("--out", required=True, help="output folder for <name>.png masks")
    p.add_argument("--data", default=None, help="'embedded' or a VOC2012 folder (default: the checkpoint's)")
    p.add_argument("--split", default=None, help="split or list file (default: the checkpoint's val split)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="e.g. 0.5 1 1.5 2 for multi-scale")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped inputs")
    p.add_argument("--crf", action="store_true", help="dense-CRF post-processing (sxy 3/3, 83/5/4)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    p.add_argument("--length", type=int, default=None, help="embedded data: number of images (default: as trained)")
    p.add_argument("--image-size", type=int, default=None, help="embedded data: image side (default: as trained)")
    p.add_argument("--seed", type=int, default=None, help="embedded data: scene seed (default: as trained)")
    p.add_argument("--device", default="auto")
    return p


def run_from_args(a: argparse.Namespace, out_dir: str | Path) -> list[str]:
    """:func:`run_inference` with the options rrm-infer and rrm-eval's ``--checkpoint`` share."""
    return run_inference(
        a.checkpoint,
        out_dir,
        a.data,
        a.split,
        a.scales,
        a.flip,
        a.crf,
        a.limit,
        a.device,
        seed=a.seed,
        length=a.length,
        image_size=a.image_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    names = run_from_args(a, a.out)
    print(f"wrote {len(names)} masks to {a.out}")
    return 0
