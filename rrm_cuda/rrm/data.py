"""Data for RRM: PASCAL VOC 2012 / SBD train_aug from a local folder, and an embedded synthetic
dataset with ground truth that needs no download.

A training sample is a dict (C = crop size)::

    image  (3, C, C) float32, ImageNet-normalised, 0 in the padding
    raw    (3, C, C) uint8 RGB, (123, 116, 103) in the padding: the authors' images de-normalised from
           the zero-padded crop, the ImageNet mean truncated to uint8 (the CRFs and the energy loss
           see these colours)
    roi    (C, C) float32, 1 on real pixels, 0 on padding (RRM's "croppings")
    mask   (C, C) int64 ground truth, 255 = unlabelled / padding (all 255 when the dataset has none)
    labels (20,) float32 image-level labels
    name   str, index int

Evaluation samples (``crop=None``) are the whole image with ``roi`` all ones.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._deps import require

require("PIL")
from PIL import Image  # noqa: E402

IGNORE = 255
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: RRM's padding colour: its crops are zero-padded after normalisation and its raw images come from
#: de-normalising them, ``uint8((0 * std + mean) * 255)``
PAD_RGB = (123, 116, 103)


def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC colour map: (n, 3) uint8 (label 255 -> white-ish (224, 224, 192))."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 VOC colours."""
    return voc_palette()[np.asarray(mask, dtype=np.int64).clip(0, 255)]


def save_mask_png(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write (H, W) labels as a palettised ("P" mode) PNG with the VOC palette, as VOC's own masks."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # "L"; putpalette makes it "P"
    img.putpalette(voc_palette().reshape(-1).tolist())
    img.save(path)


def labels_from_mask(mask: np.ndarray, num_classes: int = 20) -> np.ndarray:
    """Image-level labels from a segmentation mask: (20,) float32, 1 for each class 1..20 present."""
    lab = np.zeros(num_classes, dtype=np.float32)
    for c in np.unique(mask):
        if 1 <= c <= num_classes:
            lab[c - 1] = 1.0
    return lab


def normalize(raw: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 ImageNet-normalised."""
    return ((raw.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy()


def augment(
    raw: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    crop: int,
    scale_range: tuple[float, float] = (0.7, 1.3),
    flip: bool = True,
) -> dict[str, np.ndarray]:
    """RRM/PSA augmentation: random rescale, horizontal flip, random crop with padding (``PAD_RGB``:
    the colour of RRM's de-normalised zero padding).

    Args:
        raw: (H, W, 3) uint8; mask: (H, W) uint8 (255 = unlabelled).
        rng: the generator that decides every random choice (so a sample is reproducible).
        crop: output side C.

    Returns:
        dict of ``raw`` (C, C, 3) uint8, ``mask`` (C, C) uint8, ``roi`` (C, C) float32.
    """
    h, w = mask.shape
    s = rng.uniform(*scale_range)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    raw = np.asarray(Image.fromarray(raw).resize((nw, nh), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
    if flip and rng.random() < 0.5:
        raw, mask = raw[:, ::-1], mask[:, ::-1]
    out_raw = np.empty((crop, crop, 3), np.uint8)
    out_raw[:] = PAD_RGB
    out_mask = np.full((crop, crop), IGNORE, np.uint8)
    roi = np.zeros((crop, crop), np.float32)

    def offsets(n: int) -> tuple[int, int, int]:  # (source start, destination start, length)
        if n > crop:
            return int(rng.integers(0, n - crop + 1)), 0, crop
        return 0, int(rng.integers(0, crop - n + 1)), n

    sy, dy, ly = offsets(nh)
    sx, dx, lx = offsets(nw)
    out_raw[dy : dy + ly, dx : dx + lx] = raw[sy : sy + ly, sx : sx + lx]
    out_mask[dy : dy + ly, dx : dx + lx] = mask[sy : sy + ly, sx : sx + lx]
    roi[dy : dy + ly, dx : dx + lx] = 1.0
    return {"raw": out_raw, "mask": out_mask, "roi": roi}


def make_sample(
    raw: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    name: str,
    index: int,
    crop: int | None,
    rng: np.random.Generator | None,
    scale_range: tuple[float, float] = (0.7, 1.3),
) -> dict:
    """Build a sample dict (see the module docstring) from an (H, W, 3) image and its (H, W) mask."""
    if crop is not None:
        if rng is None:
            raise ValueError("a training crop needs a random generator")
        a = augment(raw, mask, rng, crop, scale_range)
        raw, mask, roi = a["raw"], a["mask"], a["roi"]
    else:
        roi = np.ones(mask.shape, np.float32)
    image = normalize(raw)
    image[:, roi == 0] = 0.0  # RRM pads the normalised crop with zeros (the network's input)
    return {
        "image": torch.from_numpy(image),
        "raw": torch.from_numpy(np.ascontiguousarray(raw.transpose(2, 0, 1))),
        "roi": torch.from_numpy(np.ascontiguousarray(roi)),
        "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
        "labels": torch.from_numpy(labels.astype(np.float32)),
        "name": name,
        "index": index,
    }


class AugmentedDataset(Dataset):
    """Base: ``crop`` None for evaluation; otherwise the augmentation of item i in epoch e is drawn
    from ``np.random.default_rng((seed, e, i))``, so a run and its resumption see the same crops.
    Call :meth:`set_epoch` at every epoch."""

    crop: int | None
    seed: int
    epoch: int = 0
    scale_range: tuple[float, float] = (0.7, 1.3)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator | None:
        return None if self.crop is None else np.random.default_rng((self.seed, self.epoch, index))


class VOCSegmentation(AugmentedDataset):
    """PASCAL VOC 2012 (+ SBD train_aug) from a local folder.

    Args:
        root: the VOC2012 folder (holding ``JPEGImages/``).
        split: a list name (``train_aug``, ``train``, ``val``) looked up as ``<root>/ImageSets/
            Segmentation/<split>.txt`` (or ``<root>/<split>.txt``), or a path to a list file. Lines
            are image ids or PSA-style ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` pairs.
        crop: training crop side, or None for whole evaluation images.
        cls_labels: path to PSA's ``cls_labels.npy`` (dict id -> (20,) labels); default
            ``<root>/cls_labels.npy`` when it exists, otherwise labels come from the masks.
        mask_dir: default ``SegmentationClassAug`` if present, else ``SegmentationClass``.
        masks: whether ground-truth masks are read. None (default): for evaluation (``crop=None``)
            every listed image needs its mask; in training a mask is read where it exists (its
            labels and pixels), and an image without one needs an entry in ``cls_labels.npy``.
            False: no masks (inference on a split without ground truth, e.g. VOC test): ``mask``
            is all 255.

    What can be checked without decoding is checked when the dataset is made: a missing folder,
    list, image or needed mask, or an image without image-level labels, raises FileNotFoundError
    naming it (and how many more are missing). In training an image or mask that cannot be decoded,
    or a mask whose size differs from its image's, is skipped with a warning (the next readable
    image takes its place), never a crash mid-epoch; in evaluation (``crop=None``) it raises,
    naming the file, since a substitute would be scored twice.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train_aug",
        crop: int | None = 321,
        cls_labels: str | os.PathLike | None = None,
        mask_dir: str | None = None,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.7, 1.3),
        masks: bool | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root folder not found: {self.root}")
        self.image_dir = self.root / "JPEGImages"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.crop, self.seed, self.scale_range = crop, seed, scale_range
        self.ids = self._read_list(split)
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if (self.root / "SegmentationClassAug").is_dir() else "SegmentationClass"
        self.mask_dir = self.root / mask_dir
        self.cls_labels: dict | None = None
        cls_path = Path(cls_labels) if cls_labels is not None else self.root / "cls_labels.npy"
        if cls_labels is not None and not cls_path.is_file():
            raise FileNotFoundError(f"class label file not found: {cls_path}")
        if cls_path.is_file():
            self.cls_labels = np.load(cls_path, allow_pickle=True).item()
        self.masks = masks is not False
        eval_masks = crop is None and masks is None
        self._need_masks = masks is True or eval_masks  # every listed image has one (checked below)
        if self._need_masks or (self.masks and self.cls_labels is None):
            if not self.mask_dir.is_dir():
                why = "image-level labels without cls_labels.npy"
                why = "evaluation" if eval_masks else ("masks=True" if masks else why)
                raise FileNotFoundError(f"mask folder not found: {self.mask_dir} (needed for {why})")
        have_masks = {p.stem for p in self.mask_dir.glob("*.png")} if self.masks and self.mask_dir.is_dir() else set()
        images = {p.stem for p in self.image_dir.glob("*.jpg")}
        _missing(split, [self.image_dir / f"{i}.jpg" for i in self.ids if i not in images], "image")
        if self._need_masks:
            _missing(split, [self.mask_dir / f"{i}.png" for i in self.ids if i not in have_masks], "mask")
        elif crop is not None:  # training: labels from cls_labels.npy, else from the mask
            known = self.cls_labels or {}
            unlabelled = [i for i in self.ids if i not in known and i not in have_masks]
            if unlabelled:
                raise FileNotFoundError(
                    f"no image-level labels for {unlabelled[0]} (and {len(unlabelled) - 1} more images listed in "
                    f"{split}): not in {cls_path} and no mask in {self.mask_dir}"
                )
        self._bad: set[int] = set()

    def _read_list(self, split: str) -> list[str]:
        cands = (
            [Path(split)]
            if os.sep in split or split.endswith(".txt")
            else [self.root / "ImageSets" / "Segmentation" / f"{split}.txt", self.root / f"{split}.txt"]
        )
        for p in cands:
            if p.is_file():
                ids = [Path(line.split()[0]).stem for line in p.read_text().splitlines() if line.strip()]
                if not ids:
                    raise ValueError(f"image list is empty: {p}")
                return ids
        raise FileNotFoundError(f"image list not found: {' or '.join(str(c) for c in cands)}")

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name = self.ids[index]
        ipath = self.image_dir / f"{name}.jpg"
        try:
            with Image.open(ipath) as im:
                raw = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's decoding errors
            raise _UnreadableImage(f"image {ipath} cannot be decoded: {e}") from e
        mpath = self.mask_dir / f"{name}.png"
        if self.masks and mpath.is_file():
            try:
                with Image.open(mpath) as im:
                    mask = np.asarray(im)
            except (OSError, SyntaxError, ValueError) as e:
                raise _UnreadableImage(f"mask {mpath} cannot be read: {e}") from e
            if mask.shape != raw.shape[:2]:
                raise _UnreadableImage(f"mask {mpath} has shape {mask.shape}, image {raw.shape[:2]}")
        elif self._need_masks:  # checked at construction: removed since
            raise FileNotFoundError(f"mask not found: {mpath}")
        else:
            mask = np.full(raw.shape[:2], IGNORE, np.uint8)
        if self.cls_labels is not None and name in self.cls_labels:
            labels = np.asarray(self.cls_labels[name], dtype=np.float32)
        else:  # from the mask (all 255 without one: no label, inference only)
            labels = labels_from_mask(mask)
        return raw, mask.astype(np.uint8), labels

    def __getitem__(self, index: int) -> dict:
        for k in range(len(self.ids)):
            i = (index + k) % len(self.ids)
            if i in self._bad:
                continue
            try:
                raw, mask, labels = self._load(i)
            except _UnreadableImage as e:
                if self.crop is None:
                    raise RuntimeError(
                        f"cannot use {self.ids[i]}: {e} (evaluation and inference do not skip images: another "
                        "image in its place would be scored twice)"
                    ) from None
                self._bad.add(i)
                warnings.warn(f"skipping unreadable sample {self.ids[i]}: {e}", RuntimeWarning, stacklevel=2)
                continue
            return make_sample(raw, mask, labels, self.ids[i], i, self.crop, self.rng(index), self.scale_range)
        raise RuntimeError(f"no readable image in {self.image_dir}")


class _UnreadableImage(Exception):
    """An image or mask that cannot be used: not decodable, or a mask of another size (the message
    names the file)."""


def _missing(split: str, paths: list[Path], what: str) -> None:
    if paths:
        raise FileNotFoundError(f"{what} listed in {split} not found: {paths[0]} (and {len(paths) - 1} more)")


# ---------------------------------------------------------------------------------------------
# Embedded synthetic dataset

# VOC ids of the generated object classes and their appearance: base RGB colour and texture.
SYNTH_CLASSES = {
    1: ((220, 50, 40), "stripes"),  # aeroplane: red, horizontal stripes
    7: ((40, 90, 220), "checker"),  # car: blue, checkerboard
    8: ((235, 200, 40), "dots"),  # cat: yellow, dots
    12: ((40, 170, 60), "diagonal"),  # dog: green, diagonal stripes
    15: ((200, 60, 200), "gradient"),  # person: magenta, smooth gradient
}


def _backgrounds() -> list[np.ndarray]:
    """Bundled scikit-image photos and textures (no download), as (H, W, 3) uint8; procedural noise
    when scikit-image is unavailable."""
    out: list[np.ndarray] = []
    try:
        from skimage import data as skdata

        for name in (
            "grass",
            "gravel",
            "brick",
            "coffee",
            "rocket",
            "astronaut",
            "chelsea",
            "immunohistochemistry",
        ):
            try:
                img = np.asarray(getattr(skdata, name)())
            except Exception:  # a sample missing from this scikit-image version
                continue
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            out.append(img[..., :3].astype(np.uint8))
    except ImportError:
        pass
    if not out:
        rng = np.random.default_rng(0)
        for _ in range(4):
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            out.append(np.asarray(Image.fromarray(small).resize((256, 256), Image.BICUBIC)))
    return out


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    if kind == "stripes":
        t = (np.sin(2 * np.pi * yy / period) > 0).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)
    elif kind == "dots":
        t = ((np.sin(2 * np.pi * yy / period) * np.sin(2 * np.pi * xx / period)) > 0.5).astype(np.float32)
    elif kind == "diagonal":
        t = (np.sin(2 * np.pi * (xx + yy) / period) > 0).astype(np.float32)
    else:
        t = (xx + yy) / max(h + w - 2, 1)
    return t


def _shape_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import ellipse, polygon

    m = np.zeros((h, w), bool)
    side = min(h, w)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.12, 0.3) * side, rng.uniform(0.12, 0.3) * side
    kind = rng.integers(0, 3)
    if kind == 0:
        rr, cc = ellipse(cy, cx, ry, rx, shape=(h, w), rotation=rng.uniform(0, np.pi))
    else:
        n = 4 if kind == 1 else 3
        ang = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == 2 else np.arange(4) * np.pi / 2 + rng.uniform(0, 1)
        rr, cc = polygon(cy + ry * np.sin(ang), cx + rx * np.cos(ang), shape=(h, w))
    m[rr, cc] = True
    return m


def synthetic_scene(
    seed: Sequence[int] | int, size: tuple[int, int] = (96, 96), backgrounds: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One generated scene: 1–3 textured objects of :data:`SYNTH_CLASSES` on a (tinted, partly
    desaturated) crop of a bundled photo or texture. Deterministic in ``seed``.

    Returns (image (H, W, 3) uint8, mask (H, W) uint8 with VOC class ids, 0 = background)."""
    rng = np.random.default_rng(seed)
    h, w = size
    bgs = backgrounds if backgrounds is not None else _backgrounds()
    bg = bgs[int(rng.integers(0, len(bgs)))]
    s = rng.uniform(0.5, 1.0) * min(bg.shape[0], bg.shape[1]) / max(h, w)
    ch, cw = min(bg.shape[0], int(h * s)), min(bg.shape[1], int(w * s))
    y0, x0 = int(rng.integers(0, bg.shape[0] - ch + 1)), int(rng.integers(0, bg.shape[1] - cw + 1))
    img = np.asarray(Image.fromarray(bg[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)).astype(np.float32)
    grey = img.mean(2, keepdims=True)
    tint = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    img = (0.6 * grey + 0.4 * img) * tint * rng.uniform(0.6, 1.0)
    mask = np.zeros((h, w), np.uint8)
    classes = list(SYNTH_CLASSES)
    for _ in range(int(rng.integers(1, 4))):
        c = classes[int(rng.integers(0, len(classes)))]
        colour, kind = SYNTH_CLASSES[c]
        for _try in range(5):  # reject slivers: an object covers >= 3 % of the image
            m = _shape_mask(h, w, rng)
            if m.mean() >= 0.03:
                break
        t = _texture(kind, h, w, rng)[..., None]
        col = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.15)
        obj = col * (0.65 + 0.35 * t) + rng.normal(0, 6, (h, w, 3))
        img[m] = obj[m]
        mask[m] = c
    img = img + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


class SyntheticScenes(AugmentedDataset):
    """The embedded default dataset: generated scenes with ground truth, nothing to download.

    Args:
        split: "train" or "val" (disjoint seeds).
        length: number of images.
        size: (H, W) of each generated image.
        crop: training crop side, or None for whole evaluation images.
        seed: dataset seed; image i of a split is ``synthetic_scene((seed, split_id, i))``.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 200,
        size: tuple[int, int] = (96, 96),
        crop: int | None = 80,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.7, 1.3),
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        self.split, self.length, self.size = split, length, tuple(size)
        self.crop, self.seed, self.scale_range = crop, seed, scale_range
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bgs: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask (H, W) uint8) of item ``index`` (cached)."""
        if index not in self._cache:
            if self._bgs is None:
                self._bgs = _backgrounds()
            self._cache[index] = synthetic_scene(
                (self.seed, 0 if self.split == "train" else 1, index), self.size, self._bgs
            )
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        raw, mask = self.scene(index)
        return make_sample(
            raw,
            mask,
            labels_from_mask(mask),
            f"synthetic_{self.split}_{index:04d}",
            index,
            self.crop,
            self.rng(index),
            self.scale_range,
        )


def build_dataset(
    data: str,
    split: str,
    crop: int | None,
    seed: int = 0,
    length: int | None = None,
    size: tuple[int, int] = (96, 96),
    cls_labels: str | None = None,
    masks: bool | None = None,
) -> AugmentedDataset:
    """``data`` = "embedded" (synthetic scenes) or a VOC2012 folder; ``split`` "train"/"val" for the
    embedded data (train maps from "train_aug"), a list name or file for VOC. ``masks``: as
    :class:`VOCSegmentation`'s (the embedded data always has its ground truth)."""
    if data == "embedded":
        split = "train" if split in ("train", "train_aug") else "val"
        n = length if length is not None else (200 if split == "train" else 40)
        return SyntheticScenes(split, n, size, crop, seed)
    return VOCSegmentation(data, split, crop, cls_labels=cls_labels, seed=seed, masks=masks)
