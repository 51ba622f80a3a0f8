"""Online pseudo labels of RRM: multi-scale CAM and the reliable-region labels (SPEC §5).

Shapes: B batch, H×W crop, 20 foreground classes, 21 labels (background 0), 255 = unlabelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import dense_crf, unary_from_probs

IGNORE = 255
PSEUDO_CRF = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
# Energy of a padding label: exp(-1e4) is exactly 0 in fp32/fp64, so a padded label keeps Q = 0 in
# every mean-field iteration and, with Potts compatibilities, sends no message to the real labels.
_PAD_ENERGY = 1.0e4


def _channel_argmax(x: Tensor) -> Tensor:
    """``x.argmax(1)`` (first maximum on ties) for finite (B, C, H, W) scores, as C elementwise passes:
    PyTorch's CPU argmax over a strided dimension took 80–100 ms per (4, 21, 321, 321) call on the
    2-core VM, this 30 ms. GPUs keep ATen's kernel."""
    if x.device.type != "cpu":
        return x.argmax(1)
    best = x[:, 0].clone()
    idx = torch.zeros(best.shape, dtype=torch.long, device=x.device)
    for c in range(1, x.shape[1]):
        xc = x[:, c]
        idx.masked_fill_(xc > best, c)
        best = torch.maximum(best, xc)
    return idx


def normalize_cam(cam: Tensor, labels: Tensor, eps: float = 1e-5) -> Tensor:
    """``cam · labels`` then each class divided by its spatial max + eps: (B, 20, H, W), (B, 20)."""
    cam = cam * labels[:, :, None, None].to(cam.dtype)
    return cam / (cam.flatten(2).amax(2)[:, :, None, None] + eps)


def multiscale_cam(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    out_size: Sequence[int],
    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
    cam_scale1: Tensor | None = None,
) -> Tensor:
    """Multi-scale CAM, normalised: the CAMs at ``scales`` resized to the scale-1 grid, averaged,
    upsampled (bilinear) to ``out_size``, times the label vector, each class divided by its max + 1e-5.

    Args:
        model: an :class:`~rrm_cuda.rrm.model.RRM` (or DDP-wrapped one).
        images: (B, 3, H, W) normalised images.
        labels: (B, 20) image-level labels in {0, 1}.
        out_size: (H', W') of the result (the crop).
        scales: image scales; scale 1.0 must be among them.
        cam_scale1: the scale-1 CAM (B, 20, h, w) of a forward already done (e.g. the training
            forward); detached here. Other scales never carry gradients.

    Returns:
        (B, 20, H', W') float32 normalised CAMs in [0, 1), zero for absent classes.
    """
    net = getattr(model, "module", model)
    if 1.0 not in [float(s) for s in scales]:
        raise ValueError(f"scales must contain 1.0; got {tuple(scales)}")
    with torch.no_grad():
        if cam_scale1 is None:
            cam_scale1 = net.cam(net.backbone(images))
        base = cam_scale1.detach().float()
        total = base.clone()
        for s in scales:
            if float(s) == 1.0:
                continue
            x = F.interpolate(
                images,
                scale_factor=float(s),
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
            cam = net.cam(net.backbone(x)).float()
            total += F.interpolate(cam, size=base.shape[2:], mode="bilinear", align_corners=False)
        cam = F.interpolate(total / len(scales), size=tuple(out_size), mode="bilinear", align_corners=False)
        return normalize_cam(cam, labels.float())


@dataclass
class ReliableLabels:
    """label (B, H, W) int64 final pseudo label; crf_label (B, H, W) the CRF label before the
    CAM-reliability test; cam_sure (B, H, W) bool CAM-reliable region; crf_la / crf_ha (B, 21, H, W)
    CRF probabilities at α = 4 / 32 (zero for absent classes)."""

    label: Tensor
    crf_label: Tensor
    cam_sure: Tensor
    crf_la: Tensor
    crf_ha: Tensor


def _batched_crf(
    image: Tensor, cams: Tensor, present: Tensor, alphas: Sequence[float], iterations: int, crf_params: dict
) -> tuple[list[Tensor], list[Tensor]]:
    """CRFs on [bg_α, present-class CAMs] for every α in one batched call, sharing each image's
    lattices between its α CRFs. Each image keeps only its present classes (as the original does),
    padded to a common label count with labels of energy ``_PAD_ENERGY`` that stay at probability 0.
    Returns per α a (B, 21, H, W) probability tensor and the (B, H, W) argmax class of it (taken on
    the CRF's few labels)."""
    B, _, H, W = cams.shape
    dev = cams.device
    # Which classes each image has is read to the host once (the CRF's label count L sizes it);
    # everything else stays on the device: no synchronisation per image or class.
    present_h = present.cpu()
    counts = present_h.sum(1)
    L = 1 + int(counts.max()) if B else 1
    outs = [cams.new_zeros(B, 21, H, W) for _ in alphas]
    if L == 1:
        for o in outs:
            o[:, 0] = 1.0
        return outs, [cams.new_zeros(B, H, W, dtype=torch.long) for _ in alphas]
    # cls[b, j]: the class of CRF label j (0 background, c + 1 for CAM channel c); padding labels
    # point to a dummy channel 21 of the scatter below and to class 0 for the argmax (never chosen).
    cls_h = torch.zeros(B, L, dtype=torch.long)
    pad_h = torch.ones(B, L - 1, dtype=torch.bool)
    for b in range(B):
        idx = present_h[b].nonzero().flatten()
        cls_h[b, 1 : 1 + idx.numel()] = idx + 1
        pad_h[b, : idx.numel()] = False
    if dev.type == "cuda":  # pinned + non_blocking: the copies do not wait for the GPU queue
        cls_h, pad_h = cls_h.pin_memory(), pad_h.pin_memory()
    cls = cls_h.to(dev, non_blocking=True)
    pad = pad_h.to(dev, non_blocking=True)
    sel = (cls[:, 1:] - 1).clamp(min=0)[:, :, None, None].expand(-1, -1, H, W)
    fg_unary = torch.where(pad[:, :, None, None], _PAD_ENERGY, unary_from_probs(cams.gather(1, sel)))
    mx = cams.amax(1)  # absent classes are zero and CAMs are >= 0: the max over present classes
    unaries = [torch.cat([unary_from_probs((1.0 - mx) ** alpha)[:, None], fg_unary], 1) for alpha in alphas]
    # Unaries of all α stacked, the images once: dense_crf builds each image's lattices once and
    # shares them between its α CRFs (item a·B + b uses image b).
    q = dense_crf(torch.cat(unaries), image.float(), iterations=iterations, **crf_params)
    dst = torch.where(pad, 21, cls[:, 1:])[:, :, None, None].expand(-1, -1, H, W)
    argmaxes = []
    for a, o in enumerate(outs):
        qa = q[a * B : (a + 1) * B]
        full = cams.new_zeros(B, 22, H, W)
        full[:, 0] = qa[:, 0]
        full.scatter_(1, dst, qa[:, 1:])
        o.copy_(full[:, :21])
        # padding labels keep Q = 0 < any real label's Q, and classes keep their order: the argmax
        # of the (B, 21) tensor, first maximum included
        argmaxes.append(cls.gather(1, _channel_argmax(qa).flatten(1)).view(B, H, W))
    return outs, argmaxes


def _cam_sure(
    cam_all: Tensor,
    cam_img: Tensor,
    la_label: Tensor,
    present: Tensor,
    bg_threshold: float,
    cam_min: float,
    cam_percentile: float,
    vectorised: bool | None = None,
) -> Tensor:
    """RRM's CAM-reliable region (B, H, W): for every class c of image b's α=4 CRF label, the pixels
    whose CAM argmax is c with CAM above the ``cam_percentile`` quantile of that region's values
    > ``cam_min`` (the original's ``values[int(n * p)]`` of the sorted values); background where the
    argmax is background and bg > ``bg_threshold``.

    Two formulations with the same result: per (image, class) on the CPU (sorts only the selected
    values), and one batched sort over the present (image, class) pairs without a host
    synchronisation (the default on GPUs, where each ``.item()`` drains the queue)."""
    B, H, W = cam_img.shape
    if vectorised is None:
        vectorised = cam_all.device.type != "cpu"
    if not vectorised:
        cam_sure = torch.zeros_like(la_label, dtype=torch.bool)
        for b in range(B):
            for c in la_label[b].unique().tolist():
                region = cam_img[b] == c
                cam_c = torch.where(region, cam_all[b, c], torch.zeros_like(cam_all[b, c]))
                if c == 0:
                    cam_sure[b] |= cam_c > bg_threshold
                    continue
                values = cam_c[cam_c > cam_min].sort().values
                if values.numel() == 0:  # the original raises IndexError here: no reliable pixel for c
                    continue
                cam_sure[b] |= cam_c > values[int(values.numel() * cam_percentile)]
        return cam_sure
    # classes that occur in each image's CRF label: (B, 21)
    occurs = torch.zeros(B, 21, dtype=torch.bool, device=la_label.device)
    occurs.scatter_(1, la_label.flatten(1), True)
    bg = torch.where(cam_img == 0, cam_all[:, 0], torch.zeros_like(cam_all[:, 0]))
    cam_sure = (bg > bg_threshold) & occurs[:, :1, None]
    pairs = present.nonzero() if present.device.type == "cpu" else present.cpu().nonzero()
    if pairs.numel() == 0:
        return cam_sure
    bi = pairs[:, 0].to(cam_all.device, non_blocking=True)
    ci = (pairs[:, 1] + 1).to(cam_all.device, non_blocking=True)  # CAM channel -> cam_all channel
    x = cam_all[bi, ci].flatten(1)  # (K, HW)
    cam_c = torch.where(cam_img[bi].flatten(1) == ci[:, None], x, torch.zeros_like(x))
    sel = cam_c > cam_min
    n = sel.sum(1)
    # the selected values first, ascending; the k-th of them is the threshold
    srt = torch.where(sel, cam_c, torch.full_like(x, math.inf)).sort(1).values
    k = (n.double() * cam_percentile).floor().long().clamp(max=x.shape[1] - 1)
    thr = torch.where(n > 0, srt.gather(1, k[:, None])[:, 0], math.inf)
    hit = ((cam_c > thr[:, None]) & occurs[bi, ci][:, None]).view(-1, H, W)
    return _or_rows(cam_sure, bi, hit)


def _or_rows(acc: Tensor, rows: Tensor, masks: Tensor) -> Tensor:
    """acc[rows[k]] |= masks[k] for every k (rows may repeat), without a host synchronisation."""
    add = torch.zeros(acc.shape, dtype=torch.int32, device=acc.device)
    add.index_add_(0, rows, masks.to(torch.int32))
    return acc | (add > 0)


def reliable_label_parts(
    image: Tensor,
    cams: Tensor,
    labels: Tensor,
    *,
    iterations: int = 10,
    crf_params: dict | None = None,
    alphas: tuple[float, float] = (4.0, 32.0),
    crf_threshold: float = 0.8,
    bg_threshold: float = 0.8,
    cam_min: float = 0.1,
    cam_percentile: float = 0.6,
) -> ReliableLabels:
    """:func:`reliable_labels` with its intermediate results (for panels and tests)."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W); got {tuple(image.shape)}")
    if cams.dim() != 4 or cams.shape[1] != 20 or cams.shape[0] != image.shape[0] or cams.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"cams must have shape (B, 20, H, W) matching image {tuple(image.shape)}; got {tuple(cams.shape)}"
        )
    if labels.shape != (cams.shape[0], 20):
        raise ValueError(f"labels must have shape (B, 20) = ({cams.shape[0]}, 20); got {tuple(labels.shape)}")
    crf_params = dict(PSEUDO_CRF if crf_params is None else crf_params)
    cams = cams.detach().float()
    present = labels.detach() > 1e-5
    present_h = present.cpu()  # the one host read of the step on a GPU (which classes each image has)
    cam_np = cams * present[:, :, None, None]
    bg_ha = (1.0 - cam_np.amax(1, keepdim=True)) ** alphas[1]
    cam_all = torch.cat([bg_ha, cam_np], 1)
    cam_img = _channel_argmax(cam_all)

    (crf_la, crf_ha), (la_label, ha_label) = _batched_crf(
        image.detach(), cam_np, present_h, alphas, iterations, crf_params
    )
    crf_label = la_label.clone()
    crf_label[la_label == 0] = IGNORE

    cam_sure = _cam_sure(cam_all, cam_img, la_label, present_h, bg_threshold, cam_min, cam_percentile)
    crf_label[ha_label == 0] = 0
    confidence = torch.cat([crf_ha[:, :1], crf_la[:, 1:]], 1).amax(1)
    label = crf_label.clone()
    label[(confidence < crf_threshold) | ~cam_sure] = IGNORE
    return ReliableLabels(label, crf_label, cam_sure, crf_la, crf_ha)


def reliable_labels(
    image: Tensor,
    cams: Tensor,
    labels: Tensor,
    *,
    iterations: int = 10,
    crf_params: dict | None = None,
    alphas: tuple[float, float] = (4.0, 32.0),
    crf_threshold: float = 0.8,
    bg_threshold: float = 0.8,
    cam_min: float = 0.1,
    cam_percentile: float = 0.6,
) -> Tensor:
    """RRM's reliable pseudo labels (SPEC §5), batched; both CRFs of the batch run in one
    :func:`rrm_cuda.dense_crf` call.

    With ``bg_α = (1 − max_c cam_c)^α``: dense CRFs (``iterations``; Gaussian sxy 3 compat 3,
    bilateral sxy 80 srgb 13 compat 10; unary −log clip(p, 1e-5, 1) on [bg_α, present CAMs]) at
    α = 4 and α = 32. CRF label: the α=4 argmax where it is a foreground class, 0 where the α=32
    argmax is background, 255 where α=4 says background and α=32 foreground. CAM-reliable: for each
    class c of the α=4 CRF label, the pixels whose CAM argmax over [bg_32, cams] is c with CAM above
    the 60th percentile of those values > 0.1 (top 40 %); background where that argmax is background
    and bg_32 > 0.8. The label is kept where the CRF confidence ``max(bg prob at α=32, fg probs at
    α=4) ≥ 0.8`` and the pixel is CAM-reliable; 255 elsewhere. A class with no CAM value > 0.1
    contributes no reliable pixel (the original raised IndexError).

    Args:
        image: (B, 3, H, W) RGB on the 0–255 scale (uint8 or float), the crop the CAMs describe.
        cams: (B, 20, H, W) normalised CAMs (:func:`multiscale_cam`), >= 0.
        labels: (B, 20) image-level labels; classes with label <= 1e-5 are ignored.

    Returns:
        (B, H, W) int64 labels in {0..20, 255}.

    Example:
        >>> cams = torch.zeros(1, 20, 16, 16); cams[0, 3, 4:12, 4:12] = torch.linspace(0.5, 1.0, 8)[:, None]
        >>> labels = torch.zeros(1, 20); labels[0, 3] = 1
        >>> image = torch.zeros(1, 3, 16, 16); image[..., 4:12, 4:12] = 200
        >>> lab = reliable_labels(image, cams, labels)
        >>> int(lab[0, 10, 8]), int(lab[0, 5, 8]), int(lab[0, 0, 0])
        (4, 255, 0)
    """
    return reliable_label_parts(
        image,
        cams,
        labels,
        iterations=iterations,
        crf_params=crf_params,
        alphas=alphas,
        crf_threshold=crf_threshold,
        bg_threshold=bg_threshold,
        cam_min=cam_min,
        cam_percentile=cam_percentile,
    ).label
