"""Online pseudo labels of RRM: multi-scale CAM and the reliable-region labels (SPEC §5).

Shapes: B batch, H×W crop, 20 foreground classes, 21 labels (background 0), 255 = unlabelled.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import dense_crf

IGNORE = 255
PSEUDO_CRF = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
# Energy of a padding label: a padded label keeps Q = 0 in every mean-field iteration (exactly on
# the CPU, whose softmax gives 0 below exp(-86); a denormal at most on a GPU) and, with Potts
# compatibilities, sends no message to the real labels; its Q is set to exactly 0 before it reaches
# the outputs.
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
    CRF probabilities at α = 4 / 32 (zero for absent classes; None when not asked for)."""

    label: Tensor
    crf_label: Tensor
    cam_sure: Tensor
    crf_la: Tensor | None
    crf_ha: Tensor | None


def _host_to(rows: list, device: torch.device) -> Tensor:
    """An int64 tensor of nested lists built on the host, on ``device`` without waiting for its queue
    (pinned memory, asynchronous copy): one copy for every index table of a step."""
    t = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _unary_(p: Tensor) -> Tensor:
    """``unary_from_probs`` in place: ``-log(clip(p, 1e-5, 1))`` (the same operations)."""
    return p.clamp_(min=1e-5, max=1.0).log_().neg_()


def _batched_crf(
    image: Tensor,
    cams: Tensor,
    one_minus_max: Tensor,
    present: Tensor,
    alphas: Sequence[float],
    iterations: int,
    crf_params: dict,
    check_inputs: bool = True,
    probabilities: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """CRFs on [bg_α, present-class CAMs] for every α in one batched call, sharing each image's
    lattices between its α CRFs. Each image keeps only its present classes (as the original does),
    padded to a common label count with labels of energy ``_PAD_ENERGY`` that stay at probability 0.

    Args: ``cams`` (B, 20, H, W) with absent classes zeroed, ``one_minus_max`` (B, H, W) ``1 − max_c
    cams``, ``present`` (B, 20) bool on the host.

    Returns (item a·B + b for α ``alphas[a]`` and image b): the (A·B, 21, H, W) probabilities (None
    with ``probabilities=False``: the training step needs only the next three), the (A·B, H, W)
    argmax class of each (taken on the CRF's few labels), for ``alphas[0]`` the (B, H, W) largest
    foreground probability, and the (A·B, H, W) background probabilities."""
    A = len(alphas)
    B, _, H, W = cams.shape
    dev = cams.device
    # Which classes each image has is read to the host once (the CRF's label count L sizes it);
    # everything else stays on the device: no synchronisation per image or class.
    rows = present.tolist()
    classes = [[c for c in range(20) if r[c]] for r in rows]
    L = 1 + max((len(cs) for cs in classes), default=0)
    if L == 1:
        out = cams.new_zeros(A * B, 21, H, W)
        out[:, 0] = 1.0
        background = cams.new_zeros(A * B, H, W, dtype=torch.long)  # every pixel's CRF label
        return out if probabilities else None, background, cams.new_zeros(B, H, W), out[:, 0]
    # Per image b and CRF label j: cls, the class of the label (0 background, c + 1 for CAM channel
    # c; 0 for padding, never the argmax); dst, the output channel it is scattered to (padding labels,
    # their Q zeroed, to distinct absent classes, which stay 0); sel, the CAM channel of its unary
    # (padding: any); pad, 1 for padding labels. One host-to-device copy for all four.
    tables: list[list[list[int]]] = [[], [], [], []]
    for cs in classes:
        n_pad = L - 1 - len(cs)
        absent = [c + 1 for c in range(20) if c not in cs][:n_pad]
        tables[0].append([0] + [c + 1 for c in cs] + [0] * n_pad)
        tables[1].append([0] + [c + 1 for c in cs] + absent)
        tables[2].append([0] + cs + [0] * n_pad)
        tables[3].append([0] * (1 + len(cs)) + [1] * n_pad)
    cls, dst, sel, pad = _host_to(tables, dev).unbind(0)
    # The unaries of all α in one (A, B, L, H, W) tensor: background rows per α, the foreground
    # rows (the same for every α) computed once and copied.
    u = cams.new_empty(A, B, L, H, W)
    fg = _unary_(cams.gather(1, sel[:, 1:, None, None].expand(-1, -1, H, W)))
    padb = pad.bool()
    u[:, :, 1:] = fg.masked_fill_(padb[:, 1:, None, None], _PAD_ENERGY)
    for a, alpha in enumerate(alphas):
        torch.pow(one_minus_max, alpha, out=u[a, :, 0])
    _unary_(u[:, :, 0])
    # The images once: dense_crf builds each image's lattices once and shares them between its α
    # CRFs (item a·B + b uses image b).
    img = image if image.dtype in (torch.uint8, torch.float32) else image.float()
    q = dense_crf(u.view(A * B, L, H, W), img, iterations=iterations, check_inputs=check_inputs, **crf_params)
    q5 = q.view(A, B, L, H, W)
    # padding labels keep Q ~ 0 (see _PAD_ENERGY) < any real label's Q, and classes keep their order:
    # the argmax of the (·, 21) tensor, first maximum included
    labels = cls.expand(A, B, L).gather(2, _channel_argmax(q).view(A, B, H * W)).view(A * B, H, W)
    # padding labels' Q set to exactly 0 (the absent classes they are scattered to stay 0)
    q5.masked_fill_(padb[None, :, :, None, None], 0.0)
    out = None
    if probabilities:  # (A·B, 21, H, W): 69 MB at B 4, 321²; its fill and scatter are 4 % of a CPU step
        out = cams.new_zeros(A * B, 21, H, W)  # after the CRF's launch: off the host-bound stretch
        out.view(A, B, 21, H, W).scatter_(2, dst[None, :, :, None, None].expand(A, -1, -1, H, W), q5)
    # absent classes and padding labels are 0 <= the probabilities: the same maximum as over the 20;
    # label 0 is every image's background (dst 0)
    return out, labels, q5[0, :, 1:].amax(1), q[:, 0]


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
    synchronisation (the default on GPUs, where each ``.item()`` drains the queue). ``present``:
    (B, 20) bool on the host."""
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
                values = cam_c[cam_c > cam_min]
                n = values.numel()
                if n == 0:  # the original raises IndexError here: no reliable pixel for c
                    continue
                k = int(n * cam_percentile)  # the original's sorted(values)[k]: a selection, not a sort
                kth = torch.kthvalue(values, k + 1).values  # 0 <= k < n for cam_percentile in [0, 1)
                cam_sure[b] |= cam_c > kth
        return cam_sure
    # Each class c of image b contributes the pixels of its region (cam_img == c) whose CAM exceeds
    # its threshold T[b, c] (bg_threshold for the background, the percentile value for a present
    # class; inf where c is not in the CRF label or has no value > cam_min), and every pixel outside
    # the region when 0 > T[b, c] (the original compares the CAM zeroed outside the region). So a
    # pixel is reliable iff its argmax CAM exceeds T[b, argmax], or some other class has T < 0.
    dev = cam_all.device
    occurs = torch.zeros(B, 21, dtype=torch.bool, device=dev)  # classes in each image's CRF label
    occurs.scatter_(1, la_label.flatten(1), True)
    T = cam_all.new_full((B, 21), math.inf)
    T[:, 0] = bg_threshold
    pairs = [[b, c + 1] for b, row in enumerate(present.tolist()) for c in range(20) if row[c]]
    if pairs:
        bi, ci = _host_to(pairs, dev).unbind(1)  # (K,) images, cam_all channels
        x = cam_all[bi, ci].flatten(1)  # (K, HW)
        cam_c = x.masked_fill_(cam_img[bi].flatten(1) != ci[:, None], 0.0)  # zero outside the region
        sel = cam_c > cam_min
        # the selected values first, ascending (the rest inf); the k-th of them is the threshold
        # (inf when none is selected: k = 0)
        srt = torch.where(sel, cam_c, math.inf).sort(1).values
        k = (sel.sum(1).double() * cam_percentile).long()  # floor(n p) < n <= HW: p in [0, 1)
        T.index_put_((bi, ci), srt.gather(1, k[:, None])[:, 0])
    T.masked_fill_(~occurs, math.inf)
    cam_sure = cam_all.gather(1, cam_img[:, None])[:, 0] > T.gather(1, cam_img.flatten(1)).view(B, H, W)
    if not (bg_threshold >= 0 and cam_min >= 0):  # thresholds may be negative (never with CAMs >= 0)
        neg = T < 0
        others = neg.sum(1)[:, None] - neg.gather(1, cam_img.flatten(1)).long()
        cam_sure |= (others > 0).view(B, H, W)
    return cam_sure


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
    check_inputs: bool = True,
    probabilities: bool = True,
) -> ReliableLabels:
    """:func:`reliable_labels` with its intermediate results (for panels and tests);
    ``probabilities=False`` leaves out the two (B, 21, H, W) CRF probability tensors (``crf_la``,
    ``crf_ha`` None), which a training step does not use."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W); got {tuple(image.shape)}")
    if cams.dim() != 4 or cams.shape[1] != 20 or cams.shape[0] != image.shape[0] or cams.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"cams must have shape (B, 20, H, W) matching image {tuple(image.shape)}; got {tuple(cams.shape)}"
        )
    if labels.shape != (cams.shape[0], 20):
        raise ValueError(f"labels must have shape (B, 20) = ({cams.shape[0]}, 20); got {tuple(labels.shape)}")
    if len(alphas) != 2 or not all(isinstance(a, numbers.Real) and math.isfinite(a) and a > 0 for a in alphas):
        raise ValueError(f"alphas must be two positive numbers (the background's low and high powers); got {alphas!r}")
    if not (isinstance(cam_percentile, numbers.Real) and 0.0 <= cam_percentile < 1.0):
        raise ValueError(f"cam_percentile must be a number in [0, 1); got {cam_percentile!r}")
    crf_params = dict(PSEUDO_CRF if crf_params is None else crf_params)
    B, _, H, W = cams.shape
    if cams.requires_grad:
        cams = cams.detach()
    present = (labels.detach() if labels.requires_grad else labels) > 1e-5
    present_d = present
    if present.device.type == "cpu" and cams.device.type != "cpu":
        # labels on the host (as a data loader gives them): the classes are known without reading
        # the device back; the device copy is asynchronous (pinned memory)
        pinned = present.pin_memory() if cams.device.type == "cuda" else present
        present_d = pinned.to(cams.device, non_blocking=True)
    # cam_all = [bg_α1, cams of the present classes] written in place (no concatenation pass); an
    # absent class's CAM is never read (0 there, even where it is NaN: the original reads present
    # classes only)
    cam_all = cams.new_empty(B, 21, H, W, dtype=torch.float32)
    c32 = cams if cams.dtype == torch.float32 else cams.float()  # where's out takes its inputs' dtype
    cam_np = torch.where(present_d.reshape(B, 20, 1, 1), c32, c32.new_zeros(()), out=cam_all[:, 1:])
    one_minus_max = 1.0 - cam_np.amax(1)
    torch.pow(one_minus_max, alphas[1], out=cam_all[:, 0])
    cam_img = _channel_argmax(cam_all)
    # With labels on the device, the host read of the step on a GPU (which classes each image has),
    # after the work above is queued: the GPU runs it while the host waits, and the host-bound
    # stretch from this read to the CRF's kernels (every op launched in it leaves the GPU idle)
    # holds only the unaries.
    present_h = present.cpu()  # free for host labels

    if check_inputs and not bool(torch.isfinite(cam_np).all()):  # clipped into the unary, Inf would pass
        bad = "NaN" if bool(cam_np.isnan().any()) else "Inf"
        raise ValueError(f"cams contains {bad} values in a present class")
    crf, crf_labels, fg_max, bg = _batched_crf(
        image.detach() if image.requires_grad else image,
        cam_np,
        one_minus_max,
        present_h,
        alphas,
        iterations,
        crf_params,
        check_inputs,
        probabilities,
    )
    crf_la, crf_ha = (crf[:B], crf[B:]) if crf is not None else (None, None)
    la_label, ha_label = crf_labels[:B], crf_labels[B:]
    crf_label = la_label.masked_fill(la_label == 0, IGNORE)

    cam_sure = _cam_sure(cam_all, cam_img, la_label, present_h, bg_threshold, cam_min, cam_percentile)
    crf_label.masked_fill_(ha_label == 0, 0)
    confidence = torch.maximum(bg[B:], fg_max)  # max(α32 bg probability, α4 fg probabilities)
    label = crf_label.masked_fill((confidence < crf_threshold) | ~cam_sure, IGNORE)
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
    check_inputs: bool = True,
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
        labels: (B, 20) image-level labels; classes with label <= 1e-5 are ignored. On any
            device: host labels (as a data loader gives them) spare the one read of the device
            that finds each image's classes.
        check_inputs: check the present classes' CAMs and the CRF's inputs for NaN/Inf (device
            synchronisations), as :func:`rrm_cuda.dense_crf` does; unchecked, non-finite CAMs give
            meaningless labels instead of an error (the training loop checks its CAMs with its
            logged values). Absent classes' CAMs are never read, NaN or not.

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
        check_inputs=check_inputs,
        probabilities=False,
    ).label
