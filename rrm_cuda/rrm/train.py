"""One-step RRM training: classification + reliable pseudo labels + segmentation, end to end.

Run ``python python/train_rrm.py`` (or the ``rrm-train`` console script) with no argument for the
``cpu-demo`` preset: a small backbone on the embedded synthetic dataset, a few minutes on a 2-core
CPU, ending with the mIoU of the CAM baseline, of the reliable pseudo labels and of the trained
segmentation branch on the same held-out images. ``--preset aaai`` / ``--preset pr2022`` are the
papers' recipes (give ``--data /path/to/VOC2012 --pretrained res38_cls.pth``). Multi-GPU:
``torchrun --nproc_per_node N python/train_rrm.py --preset pr2022 ...`` (``batch_size`` is the
global batch, split over the processes; each process computes its own pseudo labels).

Optimiser: SGD with poly decay ``lr·(1 − it/T)^0.9`` and RRM's multipliers: 1× backbone weights,
2× backbone biases (no weight decay), 10× new layers (fc8 and the segmentation branch), 20× their
biases (no weight decay). Momentum: the original code passes the weight decay into SGD's momentum
slot (``SGD(params, lr, weight_decay)`` with positional momentum), so its effective momentum was
1e-5 ≈ 0. Here momentum is an explicit option, 0.9 by default; ``--momentum 1e-5`` reproduces the
original's optimiser exactly.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

import rrm_cuda

from . import losses as L
from ._deps import require
from .data import IGNORE, AugmentedDataset, build_dataset, colorize
from .metrics import VOC_CLASSES, confusion_matrix, iou_from_confusion, mean_iou
from .model import RRM, load_state_file
from .pseudo_labels import ReliableLabels, multiscale_cam, reliable_label_parts


@dataclass
class TrainConfig:
    """Every training option (the CLI flags are these names with dashes)."""

    # data
    data: str = "embedded"  # "embedded" or a VOC2012 folder
    train_split: str = "train_aug"
    val_split: str = "val"
    cls_labels: str | None = None
    train_length: int | None = None  # embedded data only: number of generated images
    val_length: int | None = None
    image_size: int = 96  # embedded data only: side of the generated images
    crop: int = 321
    workers: int = 2
    # model
    backbone: str = "resnet38"
    pretrained: str | None = None
    rfam_reweight: bool = True
    freeze_bn: bool = True
    dropout: float | None = None  # classifier Dropout2d (b6/b7 scaled alike); None: 0.5, or 0 for "small"
    # optimisation
    batch_size: int = 4
    iterations: int = 20000
    lr: float = 7e-4
    weight_decay: float = 1e-5
    momentum: float = 0.9
    poly_power: float = 0.9
    grad_clip: float | None = None  # clip the global gradient norm (not in the papers' recipes)
    warmup_cls_iterations: int = 0  # classification-only iterations first (a CAM to start from)
    # then this many iterations in which the segmentation losses train the segmentation branch
    # only (backbone features detached from it), before the end-to-end training
    seg_head_only_iterations: int = 0
    # losses
    cls_weight: float = 1.0
    ce_bg_weight: float = 1.0
    ce_fg_weight: float = 1.0
    energy_weight: float = 1e-7
    energy_sigma_rgb: float = 15.0
    energy_sigma_xy: float = 100.0
    energy_scale: float = 0.5
    bcd_weight: float = 1.0
    # pseudo labels
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    crf_iterations: int = 10
    # runtime
    device: str = "auto"
    threads: int | None = None  # torch intra-op CPU threads (None: torch's default)
    amp: bool = True  # torch.autocast on CUDA only
    amp_dtype: str = "bfloat16"
    seed: int = 0
    deterministic: bool = False
    out_dir: str = "runs/rrm"
    checkpoint_every: int = 1000  # 0: only at the end
    panel_every: int = 500  # 0: no panels
    log_every: int = 10  # 0: only the last iteration
    resume: str | None = None  # a checkpoint path, or "auto" for <out_dir>/checkpoint.pt if present
    stop_at: int | None = None  # end this process after this iteration (schedulers with time limits)
    progress: bool = True
    eval_at_end: bool = True
    eval_cam_alpha: float = 4.0

    def __post_init__(self) -> None:
        # checked when the run is set up, not at the first pseudo-label step after the warm-up
        scales = tuple(float(s) for s in self.cam_scales)
        if 1.0 not in scales or not all(s > 0 for s in scales):
            raise ValueError(f"cam_scales must be positive and contain 1.0 (RRM's CAM scale); got {scales}")
        for name in ("checkpoint_every", "panel_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off); got {getattr(self, name)}")
        for name, low in (("batch_size", 1), ("crop", 16), ("iterations", 0), ("crf_iterations", 0), ("workers", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}; got {getattr(self, name)}")


#: the crop RRM's energy-loss settings (weight 1e-7, sigma_xy 100) were chosen for
RRM_CROP = 321


def energy_settings_for_crop(crop: int, weight: float = 1e-7, sigma_xy: float = 100.0) -> dict[str, float]:
    """RRM's energy-loss ``weight`` and ``sigma_xy`` (set for 321-px crops) carried over to ``crop``.

    The loss is a sum over pixel pairs ``Σ_ij W_ij ...`` (not a mean), with a Gaussian of
    ``sigma_xy`` pixels. Keeping the geometry (``sigma_xy · crop/321``, the same fraction of the
    image) the number of pixels scales as ``crop²`` and each pixel's neighbourhood ``σ_xy²`` as
    ``crop²``, so the loss scales as ``crop⁴``; the weight is multiplied by ``(321/crop)⁴`` to keep
    its balance with the (mean) cross-entropy terms. Measured on the embedded data (weight 1,
    scale 0.5): −7.2e6 per 321-px image, −1.16e4 per 64-px image with sigma_xy 20, a ratio of 620
    against the rule's 633. At 64 px RRM's unscaled 1e-7 makes the term ≈ 600× weaker than in
    the paper (−0.003 vs −0.7 per image): nearly off."""
    r = RRM_CROP / crop
    return {"energy_weight": weight * r**4, "energy_sigma_xy": sigma_xy / r}


PRESETS: dict[str, dict] = {
    # AAAI 2020: from a VOC classification checkpoint (PSA's res38_cls.pth). The AAAI model had no
    # R-FAM and no BCD: BCD is off and the attention runs without re-weighting (the closest this
    # model gets). Momentum stays at the explicit 0.9; ``--momentum 1e-5`` is the original's.
    "aaai": dict(
        backbone="resnet38",
        batch_size=4,
        crop=321,
        lr=7e-4,
        weight_decay=1e-5,
        iterations=20000,
        bcd_weight=0.0,
        rfam_reweight=False,
    ),
    # Pattern Recognition 2022 (R-FAM + BCD).
    "pr2022": dict(backbone="resnet38", batch_size=8, crop=321, lr=1e-3, weight_decay=1e-5, iterations=40000),
    # Small backbone on the embedded data: minutes on a 2-core CPU. The backbone is trained from
    # scratch, so its BatchNorm trains too, and a classification warm-up gives the CAM a start
    # (the papers start from a classification checkpoint instead). One CPU thread: these tensors are
    # too small for intra-op parallelism to pay, and on a shared machine extra threads oversubscribe
    # the cores (measured here: 0.13 s vs 0.6–2.9 s per step under load). Gradient clipping: the
    # from-scratch heads at 10×/20× lr with momentum 0.9 diverged within ~20 pseudo-label
    # iterations without it (base lr 0.01 and 0.03 alike); with norm 10 the run is stable. Scales
    # 1, 0.5, 1.5 (no 2: a 64-px crop at scale 2 costs more than it adds on 8×8 CAM grids).
    "cpu-demo": dict(
        backbone="small",
        data="embedded",
        train_length=160,
        # 96 held-out images (~5 s of evaluation): on 24 a model's mIoU moved by up to 6 points
        # (seed 2: CAM baseline 68.6 on the first 24, 74.4 on 96), more than the CAM/seg gaps compared
        val_length=96,
        image_size=80,
        crop=64,
        batch_size=4,
        # 600 classification-only iterations, then 1000 with the segmentation losses: with 400 of
        # them the branch stayed below the CAM baseline on 3 of 4 runs (benchmarks/NOTES.md §28)
        iterations=1600,
        warmup_cls_iterations=600,
        # the first 200 pseudo-label iterations train the segmentation branch only (backbone features
        # detached from its losses), as when a new head is put on a trained backbone: while the branch
        # is random its CE spikes (5-12), and the CE's gradient on the from-scratch backbone is ~30x
        # the classification loss's, so it reshaped the features the CAMs (and the next pseudo labels)
        # come from (one run: CAM 35.7 -> 26.3 mIoU in those 200 iterations, two classes lost for
        # good). Measured over seeds 0-3 (benchmarks/NOTES.md §28): segmentation > CAM baseline on 3 of 4 seeds
        # instead of 2, mean segmentation 76.6 vs 73.9 and + CRF 85.5 vs 82.1 mIoU (24 images;
        # seed 1 fell from 72.2 to 64.1), no slower.
        seg_head_only_iterations=200,
        lr=0.01,
        weight_decay=1e-4,
        threads=1,
        grad_clip=10.0,
        freeze_bn=False,
        cam_scales=(1.0, 0.5, 1.5),
        workers=0,
        checkpoint_every=250,
        panel_every=100,
        # SPEC's weights once this build of rrm_cuda provides the ops, off until then; the energy
        # loss's weight and sigma_xy carried over from 321- to 64-px crops (energy_settings_for_crop:
        # 6.3e-5 and 19.9). With RRM's 1e-7 as is, the term is ~600x weaker than in the paper and the
        # segmentation branch ended below the CAM baseline (51.8 vs 57.5 mIoU; 65.5 vs 63.2 with
        # weight 6e-5, sigma_xy 20, measured here).
        **(energy_settings_for_crop(64) if hasattr(rrm_cuda, "DenseEnergyLoss") else {"energy_weight": 0.0}),
        bcd_weight=1.0 if hasattr(rrm_cuda, "bcd_loss") else 0.0,
        out_dir="runs/rrm-cpu-demo",
    ),
}


def make_config(preset: str = "cpu-demo", **overrides) -> TrainConfig:
    """A preset's config with ``overrides`` applied (unknown names raise TypeError)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
    return TrainConfig(**{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------
# Helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local_gpu() -> int:
    """This process's GPU: LOCAL_RANK among the visible ones (modulo their count, so that a launcher
    that gives each process one GPU through CUDA_VISIBLE_DEVICES gets cuda:0)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def resolve_device(name: str) -> torch.device:
    """ "auto" -> this process's GPU (``_local_gpu``) when CUDA is available, else cpu; "cuda" (no
    index) -> the same GPU, so that each process of a torchrun job takes its own."""
    if name == "auto":
        return torch.device("cuda", _local_gpu()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", _local_gpu())
    return dev


def set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def param_groups(model: RRM, cfg: TrainConfig) -> list[dict]:
    """RRM's four groups: backbone weights 1×, backbone biases 2× (no wd), new weights 10×, new biases
    20× (no wd). 1-d parameters (biases, trainable BN affine) count as biases."""
    new_ids = {id(p) for m in model.new_layers() for p in m.parameters()}
    groups: list[list[nn.Parameter]] = [[], [], [], []]
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups[(2 if id(p) in new_ids else 0) + (1 if p.dim() == 1 else 0)].append(p)
    mults, wds = (1.0, 2.0, 10.0, 20.0), (cfg.weight_decay, 0.0, cfg.weight_decay, 0.0)
    return [
        {"params": g, "lr": cfg.lr * m, "lr_mult": m, "weight_decay": wd} for g, m, wd in zip(groups, mults, wds) if g
    ]


def poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, it: int, total: int, power: float) -> float:
    """Set every group's lr to ``base_lr·mult·(1 − it/total)^power``; returns the base factor·lr."""
    lr = base_lr * (1.0 - it / total) ** power
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]
    return lr


class ResumableSampler(DistributedSampler):
    """DistributedSampler (works with 1 process too) that can start an epoch part-way (resume)."""

    def __init__(self, dataset: AugmentedDataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _cpu_rng_state() -> dict:
    # numpy's state with its key array as a tensor: a checkpoint of tensors and Python values only
    # loads with torch.load(weights_only=True) (RRM.load_pretrained, load_checkpoint, resume)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path, model: RRM, optimizer: torch.optim.Optimizer, scaler, iteration: int, cfg: TrainConfig
) -> None:
    """Atomically write model, optimiser, AMP scaler, iteration, config and every RNG state."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "config": dataclasses.asdict(cfg),
        "rng": _cpu_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig saved in a checkpoint (ignores names this version does not know)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: (tuple(v) if k == "cam_scales" else v) for k, v in d.items() if k in names}
    return TrainConfig(**d)


def build_model(cfg: TrainConfig) -> RRM:
    model = RRM(cfg.backbone, rfam_reweight=cfg.rfam_reweight, freeze_bn=cfg.freeze_bn, dropout=cfg.dropout)
    if cfg.pretrained:
        model.load_pretrained(cfg.pretrained)
    return model


# ---------------------------------------------------------------------------------------------
# Panels and logs


def save_panel(
    path: Path, raw: Tensor, cam: Tensor, crf_label: Tensor, label: Tensor, pred: Tensor, gt: Tensor
) -> None:
    """PNG panel, one row per image: image, CAM (max over classes), CRF label, reliable label,
    prediction, ground truth (labels in the VOC palette).

    raw (B, 3, H, W) uint8; cam (B, 20, H, W); the others (B, H, W) labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = raw.shape[0]
    titles = ("image", "CAM", "CRF label", "reliable label", "prediction", "ground truth")
    fig, axes = plt.subplots(n, 6, figsize=(12, 2.1 * n), squeeze=False)
    for i in range(n):
        cols = (
            raw[i].permute(1, 2, 0).cpu().numpy(),
            cam[i].amax(0).float().cpu().numpy(),
            colorize(crf_label[i].cpu().numpy()),
            colorize(label[i].cpu().numpy()),
            colorize(pred[i].cpu().numpy()),
            colorize(gt[i].cpu().numpy()),
        )
        for j, (ax, img) in enumerate(zip(axes[i], cols)):
            ax.imshow(img, cmap="jet" if j == 1 else None, vmin=0 if j == 1 else None, vmax=1 if j == 1 else None)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


LOG_FIELDS = ("iteration", "lr", "loss", "cls", "ce_bg", "ce_fg", "energy", "bcd", "labelled", "seconds")


# ---------------------------------------------------------------------------------------------
# Evaluation of the three label sources


@torch.no_grad()
def evaluate_sources(
    model: RRM, dataset: AugmentedDataset, cfg: TrainConfig, device: torch.device, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Confusion matrices (21×21) on whole held-out images of: the CAM baseline (argmax over
    ``[(1 − max_c cam_c)^α, cams]`` with the ground-truth image labels, α = ``eval_cam_alpha``), the
    reliable pseudo labels (on their labelled pixels only; ``coverage`` is the labelled fraction),
    the segmentation branch (single scale, argmax, no CRF) and ``seg_crf``, the segmentation
    branch with RRM's inference (single scale, softmax, dense CRF: :func:`~rrm_cuda.rrm.infer.crf_refine`)."""
    from .infer import crf_refine  # infer imports this module

    model.eval()
    confs = {k: np.zeros((21, 21), np.int64) for k in ("cam", "reliable", "seg", "seg_crf")}
    labelled = total = 0
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        s = dataset[i]
        image = s["image"][None].to(device)
        raw, gt, labels = s["raw"][None].to(device), s["mask"][None], s["labels"][None].to(device)
        H, W = gt.shape[1:]
        cams = multiscale_cam(model, image, labels, (H, W), cfg.cam_scales)
        bg = (1.0 - cams.amax(1, keepdim=True)) ** cfg.eval_cam_alpha
        confs["cam"] += confusion_matrix(torch.cat([bg, cams], 1).argmax(1).cpu(), gt)
        rl = reliable_label_parts(raw, cams, labels, iterations=cfg.crf_iterations).label.cpu()
        confs["reliable"] += confusion_matrix(rl, gt)
        labelled += int((rl != IGNORE).sum())
        total += rl.numel()
        seg = F.interpolate(model(image).seg.float(), (H, W), mode="bilinear", align_corners=False)
        confs["seg"] += confusion_matrix(seg.argmax(1).cpu(), gt)
        confs["seg_crf"] += confusion_matrix(crf_refine(torch.softmax(seg, 1), raw).argmax(1).cpu(), gt)
    model.train()
    confs["coverage"] = np.array(labelled / max(total, 1))
    return confs


def format_iou_table(conf: np.ndarray) -> str:
    """Per-class IoU table (classes with a non-empty union) and the mIoU."""
    iou = iou_from_confusion(conf)
    rows = [f"  {VOC_CLASSES[c]:<12s} {100 * iou[c]:6.2f}" for c in range(len(iou)) if np.isfinite(iou[c])]
    return "\n".join([*rows, f"  {'mIoU':<12s} {100 * mean_iou(conf):6.2f}"])


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class StepOps:
    """The implementations one training step calls for its three RRM-specific parts; the defaults
    are rrm_cuda's batched ops on the training device. ``benchmarks/rrm_bench.py`` swaps in the
    original CPU path (pydensecrf per image, a per-channel CPU filter) to time both.

    - ``reliable_labels(raw, cams, labels, iterations=...) -> ReliableLabels`` (raw (B, 3, H, W)
      uint8, cams (B, 20, H, W) on the device, labels (B, 20) as the data loader gives them, on
      the host: the classes of each image are known without reading the device back);
    - ``energy_loss(images, probs, rois, seg_label, weight=, sigma_rgb=, sigma_xy=, scale_factor=)``
      as :func:`rrm_cuda.rrm.losses.energy_loss`;
    - ``bcd_loss(seg_logits, features)`` as :func:`rrm_cuda.rrm.losses.bcd_loss`.
    """

    # unchecked: the step checks its CAMs for NaN/Inf in its one host read instead
    reliable_labels: Callable[..., ReliableLabels] = functools.partial(
        reliable_label_parts, check_inputs=False, probabilities=False
    )
    energy_loss: Callable[..., Tensor] = L.energy_loss
    bcd_loss: Callable[[Tensor, Tensor], Tensor] = L.bcd_loss


def train(cfg: TrainConfig) -> dict:
    """Train RRM per ``cfg``. Returns a dict with ``iteration``, ``out_dir`` and, when evaluated, the
    mIoUs ``miou_cam``, ``miou_reliable``, ``miou_seg``, ``miou_seg_crf`` (percent) and ``coverage``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    rank, world = _rank(), _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    L.check_available(energy=bool(cfg.energy_weight), bcd=bool(cfg.bcd_weight))
    set_seed(cfg.seed + rank, cfg.deterministic)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "panels").mkdir(exist_ok=True)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    amp = cfg.amp and device.type == "cuda"
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None

    start = 0
    ckpt_path = out / "checkpoint.pt"
    resume = str(ckpt_path) if cfg.resume == "auto" and ckpt_path.is_file() else cfg.resume
    if resume and resume != "auto":
        state = load_state_file(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        _set_rng_state(state["rng"])
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    dataset = build_dataset(
        cfg.data,
        cfg.train_split,
        cfg.crop,
        cfg.seed,
        cfg.train_length,
        (cfg.image_size, cfg.image_size),
        cfg.cls_labels,
    )
    sampler = ResumableSampler(dataset, world, rank, cfg.seed)
    per_rank = cfg.batch_size // world
    per_epoch = sampler.num_samples // per_rank
    if per_epoch == 0:
        raise ValueError(f"the dataset ({len(dataset)} images) is smaller than one batch per process ({per_rank})")

    log_file = out / "log.csv"
    new_log = not (log_file.is_file() and start > 0)
    log = open(log_file, "w" if new_log else "a", newline="") if rank == 0 else None
    writer = csv.DictWriter(log, LOG_FIELDS) if log else None
    if writer and new_log:
        writer.writeheader()
    end = cfg.iterations if cfg.stop_at is None else min(cfg.stop_at, cfg.iterations)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start, desc="rrm", dynamic_ncols=True, file=sys.stdout)

    it = start
    t0 = time.time()
    model.train()
    while it < end:
        epoch, offset = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.skip = offset * per_rank
        # Its own generator: creating a loader must not draw from the global RNG (exact resume).
        loader = DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=cfg.workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch),
        )
        for batch in loader:
            if it >= end:
                break
            model.detach_seg_input = it < cfg.warmup_cls_iterations + cfg.seg_head_only_iterations
            stats = train_step(net, model, batch, optimizer, scaler, cfg, it, device, amp, amp_dtype, out)
            it += 1
            if writer and ((cfg.log_every and it % cfg.log_every == 0) or it == end):
                writer.writerow({**stats, "iteration": it, "seconds": round(time.time() - t0, 2)})
                log.flush()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lab=f"{stats['labelled']:.2f}")
            if rank == 0 and ((cfg.checkpoint_every and it % cfg.checkpoint_every == 0) or it == end):
                save_checkpoint(ckpt_path, model, optimizer, scaler, it, cfg)
    if bar:
        bar.close()
    if log:
        log.close()

    result: dict = {"iteration": it, "out_dir": str(out)}
    if it >= cfg.iterations and rank == 0:
        torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, out / "model_final.pt")
        if cfg.eval_at_end:
            val = build_dataset(
                cfg.data,
                cfg.val_split,
                None,
                cfg.seed,
                cfg.val_length,
                (cfg.image_size, cfg.image_size),
                cfg.cls_labels,
            )
            confs = evaluate_sources(model, val, cfg, device)
            for k in ("cam", "reliable", "seg", "seg_crf"):
                result[f"miou_{k}"] = 100 * mean_iou(confs[k])
            result["coverage"] = float(confs["coverage"])
            print(f"held-out images: {len(val)}")
            print(f"  CAM baseline mIoU         {result['miou_cam']:6.2f}")
            print(
                f"  reliable pseudo-label mIoU {result['miou_reliable']:6.2f} "
                f"(on the {100 * result['coverage']:.1f} % of pixels they label)"
            )
            print(f"  segmentation branch mIoU  {result['miou_seg']:6.2f}")
            print(f"  segmentation + dense CRF  {result['miou_seg_crf']:6.2f} (RRM's inference)")
    if distributed:
        dist.barrier()
    return result


def train_step(
    net: nn.Module,
    model: RRM,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scaler,
    cfg: TrainConfig,
    it: int,
    device: torch.device,
    amp: bool,
    amp_dtype: torch.dtype,
    out: Path,
    ops: StepOps | None = None,
) -> dict:
    """One iteration (``it`` counts from 0). Returns the logged statistics. ``ops``: see
    :class:`StepOps` (None: rrm_cuda's ops)."""
    ops = StepOps() if ops is None else ops
    lr = poly_lr(optimizer, cfg.lr, it, cfg.iterations, cfg.poly_power)
    image = batch["image"].to(device, non_blocking=True)
    raw = batch["raw"].to(device)
    roi = batch["roi"].to(device)
    labels_host = batch["labels"]  # the pseudo labels' class lists: no read of the device
    labels = labels_host.to(device)
    crop = tuple(image.shape[2:])
    zero = image.new_zeros(())
    # Logged values stay tensors until one host read after the backward (each float() of a GPU
    # tensor would stall the host until the queue drains, in the middle of the step).
    stats: dict[str, Tensor] = dict.fromkeys(("cls", "ce_bg", "ce_fg", "energy", "bcd"), zero)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        outp = net(image)
    loss = zero
    if cfg.cls_weight:
        cls = L.classification_loss(outp.cls_logits.float(), labels)
        loss = loss + cfg.cls_weight * cls
        stats["cls"] = cls.detach()
    labelled = zero
    cams_finite = torch.ones((), dtype=torch.bool, device=device)
    if it >= cfg.warmup_cls_iterations:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            cams = multiscale_cam(net, image, labels, crop, cfg.cam_scales, cam_scale1=outp.cam)
        parts = ops.reliable_labels(raw, cams, labels_host, iterations=cfg.crf_iterations)
        cams_finite = torch.isfinite(cams).all()
        label = parts.label.masked_fill(roi == 0, IGNORE)
        labelled = (label != IGNORE).float().mean()
        seg_up = F.interpolate(outp.seg.float(), crop, mode="bilinear", align_corners=False)
        ce_bg, ce_fg = L.seg_ce_losses(seg_up, label)
        loss = loss + cfg.ce_bg_weight * ce_bg + cfg.ce_fg_weight * ce_fg
        stats["ce_bg"], stats["ce_fg"] = ce_bg.detach(), ce_fg.detach()
        if cfg.energy_weight:
            e = ops.energy_loss(
                raw.float(),
                torch.softmax(seg_up, 1),
                roi,
                label[:, None].float(),
                weight=cfg.energy_weight,
                sigma_rgb=cfg.energy_sigma_rgb,
                sigma_xy=cfg.energy_sigma_xy,
                scale_factor=cfg.energy_scale,
            )
            loss = loss + e
            stats["energy"] = e.detach()
        if cfg.bcd_weight:
            b = ops.bcd_loss(outp.seg.float(), outp.bcd_features.float())
            loss = loss + cfg.bcd_weight * b
            stats["bcd"] = b.detach()
        if cfg.panel_every and (it + 1) % cfg.panel_every == 0 and _rank() == 0:
            n = min(2, image.shape[0])
            save_panel(
                out / "panels" / f"iter_{it + 1:06d}.png",
                raw[:n],
                cams[:n],
                parts.crf_label[:n],
                label[:n],
                seg_up[:n].argmax(1),
                batch["mask"][:n],
            )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    # the step's one host read: logged values and the finiteness check, before any weight changes
    names = list(stats)
    scalars = [stats[k] for k in names] + [loss.detach(), labelled, cams_finite]
    values = torch.stack([v.float().reshape(()) for v in scalars]).tolist()
    logged = dict(zip(names, values[: len(names)]))
    loss_value, labelled_value, finite_cams = values[len(names) : len(names) + 3]
    if not finite_cams:
        raise FloatingPointError(f"non-finite CAMs (NaN/Inf) at iteration {it + 1}: the network diverged; {logged}")
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss {loss_value} at iteration {it + 1}: {logged}")
    if scaler is not None:
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    return {**logged, "lr": lr, "loss": loss_value, "labelled": labelled_value}


# ---------------------------------------------------------------------------------------------
# CLI


#: --help text of each TrainConfig field (build_parser adds its TrainConfig default, and whether a
#: preset sets it)
FIELD_HELP: dict[str, str] = {
    "data": "'embedded' (generated scenes, no download) or a VOC2012 folder",
    "train_split": "training list: a name under ImageSets/Segmentation (train_aug for SBD) or a path",
    "val_split": "evaluation list (name or path)",
    "cls_labels": "PSA's cls_labels.npy (default: <data>/cls_labels.npy if present, else labels from masks)",
    "train_length": "embedded data: number of generated training images",
    "val_length": "embedded data: number of generated held-out images",
    "image_size": "embedded data: side of the generated images",
    "crop": "training crop side (random scale 0.7-1.3, flip, crop with padding)",
    "workers": "DataLoader worker processes",
    "backbone": "'resnet38' (the papers') or 'small' (a CPU-sized network)",
    "pretrained": "local weights: PSA's res38_cls.pth, a converted MXNet ResNet-38, or an RRM state dict",
    "rfam_reweight": "R-FAM re-weighting in the segmentation branch (Pattern Recognition 2022)",
    "freeze_bn": "freeze the backbone's batch-norm statistics",
    "dropout": "classifier Dropout2d rate (default: 0.5, or 0 for the small backbone)",
    "batch_size": "images per iteration (over all processes)",
    "iterations": "training iterations",
    "lr": "base learning rate (poly schedule; biases 2x, new layers' weights 10x and biases 20x)",
    "weight_decay": "SGD weight decay",
    "momentum": "SGD momentum",
    "poly_power": "poly learning-rate decay power",
    "grad_clip": "clip the global gradient norm (not in the papers' recipes)",
    "warmup_cls_iterations": "classification-only iterations first (a CAM to start from)",
    "seg_head_only_iterations": "then iterations in which the pseudo-label losses train the segmentation branch only",
    "cls_weight": "classification loss weight",
    "ce_bg_weight": "cross-entropy weight on reliable background pixels",
    "ce_fg_weight": "cross-entropy weight on reliable foreground pixels",
    "energy_weight": "dense-CRF energy loss weight (RRM: 1e-7 at 321-px crops)",
    "energy_sigma_rgb": "energy loss colour sigma",
    "energy_sigma_xy": "energy loss position sigma (pixels at full scale)",
    "energy_scale": "energy loss downscaling factor",
    "bcd_weight": "BCD feature-centre loss weight (0: off, the AAAI model)",
    "cam_scales": "multi-scale CAM scales (must contain 1.0)",
    "crf_iterations": "mean-field iterations of the pseudo-label CRFs",
    "device": "'auto' (this process's GPU if any, else cpu), 'cpu', 'cuda' or 'cuda:N'",
    "threads": "torch intra-op CPU threads (default: torch's)",
    "amp": "torch.autocast on CUDA",
    "amp_dtype": "autocast dtype: bfloat16 or float16 (with a GradScaler)",
    "seed": "random seed (also picks the embedded data's scenes)",
    "deterministic": "torch.use_deterministic_algorithms (slower; see the README)",
    "out_dir": "folder for log.csv, checkpoint.pt, model_final.pt and panels/",
    "checkpoint_every": "write checkpoint.pt every N iterations (0: only at the end)",
    "panel_every": "write a PNG panel every N iterations (0: none)",
    "log_every": "append to log.csv every N iterations (0: only the last)",
    "resume": "a checkpoint to resume from, or 'auto' for <out_dir>/checkpoint.pt if present",
    "stop_at": "end this process after iteration N (for schedulers with time limits; resume later)",
    "progress": "progress bar",
    "eval_at_end": "evaluate CAMs, pseudo labels and the segmentation branch on the held-out split at the end",
    "eval_cam_alpha": "background power of the CAM baseline in the final evaluation",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rrm-train",
        description=__doc__.split("\n\n")[0],
        epilog="The presets set: "
        + "; ".join(f"{n}: {', '.join(f'{k}={v}' for k, v in sorted(v.items()))}" for n, v in sorted(PRESETS.items())),
    )
    p.add_argument(
        "--preset",
        default="cpu-demo",
        choices=sorted(PRESETS),
        help="cpu-demo (embedded data, small backbone, CPU) or aaai / pr2022 (the papers' VOC recipes)",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = FIELD_HELP.get(f.name, "")
        if "default:" not in text:
            preset_set = any(f.name in v for v in PRESETS.values())
            text += f" (default: {f.default}{'; presets may set it' if preset_set else ''})"
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "cam_scales":
            p.add_argument(flag, dest=f.name, type=float, nargs="+", default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """CLI -> TrainConfig: the preset's values, overridden by the flags given."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset")
    overrides = {k: (tuple(v) if k == "cam_scales" else v) for k, v in args.items() if v is not None}
    return make_config(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``rrm-train``."""
    cfg = parse_config(argv)
    needs = ["skimage"] if cfg.data == "embedded" else []  # the generated scenes
    needs += ["matplotlib"] if cfg.panel_every or cfg.eval_at_end else []  # panels
    require(*needs, *(["tqdm"] if cfg.progress else []))
    t = time.time()
    result = train(cfg)
    if _rank() == 0:
        it, where = result["iteration"], result["out_dir"]
        print(f"done: {it} iterations in {time.time() - t:.1f} s, outputs in {where}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


__all__ = ["PRESETS", "StepOps", "TrainConfig", "main", "make_config", "parse_config", "train"]
