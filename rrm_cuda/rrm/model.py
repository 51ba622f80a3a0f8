"""The RRM network: ResNet-38 backbone (output stride 8), classification branch (CAM) and the
segmentation branch (local dilated sub-branch + global R-FAM attention sub-branch).

Shapes: B batch, H×W input, h×w = ceil(H/8)×ceil(W/8) feature grid, C backbone channels (4096 for
ResNet-38), K = 21 segmentation classes (background 0), 20 image-level classes.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 20  # image-level (foreground) classes of PASCAL VOC
NUM_SEG_CLASSES = 21  # with background


# ---------------------------------------------------------------------------------------------
# Backbone


class ResBlock(nn.Module):
    """Pre-activation basic block of "wider or deeper" (PSA's ``resnet38d.ResBlock``, same names)."""

    def __init__(
        self,
        cin: int,
        cmid: int,
        cout: int,
        stride: int = 1,
        first_dilation: int | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.same_shape = cin == cout and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(
            cin, cmid, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(cmid)
        self.conv_branch2b1 = nn.Conv2d(cmid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b2 = F.relu(self.bn_branch2a(x))
        b1 = x if self.same_shape else self.conv_branch1(b2)
        b2 = self.conv_branch2a(b2)
        b2 = self.conv_branch2b1(F.relu(self.bn_branch2b1(b2)))
        return b1 + b2


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck block (PSA's ``resnet38d.ResBlock_bot``, same names)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.same_shape = cin == cout and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b2 = F.relu(self.bn_branch2a(x))
        b1 = x if self.same_shape else self.conv_branch1(b2)
        b2 = self.conv_branch2a(b2)
        b2 = self.dropout_2b1(F.relu(self.bn_branch2b1(b2)))
        b2 = self.conv_branch2b1(b2)
        b2 = self.dropout_2b2(F.relu(self.bn_branch2b2(b2)))
        return b1 + self.conv_branch2b2(b2)


class ResNet38(nn.Module):
    """ResNet-38 ("wider or deeper", model A1) with output stride 8, PSA's parameter names.

    ``width`` scales every channel count (1.0: the real network, conv6 = 4096 channels; 1/16: a
    small network for CPU demos); ``depth`` caps the number of residual blocks per stage (None: the
    real 3/3/6/3 blocks of stages 2–5); ``dropout`` the Dropout2d rates inside b6 and b7. Stages 2, 3,
    4 stride 2; b5 dilation 2; b6, b7 dilation 4.

    forward: (B, 3, H, W) normalised image -> conv6 (B, out_channels, ceil(H/8), ceil(W/8)).
    """

    def __init__(self, width: float = 1.0, depth: int | None = None, dropout: tuple[float, float] = (0.3, 0.5)) -> None:
        super().__init__()

        def c(n: int) -> int:
            return max(4, int(round(n * width / 4)) * 4)

        def blocks(n: int) -> int:
            return n if depth is None else max(1, min(n, depth))

        self.width, self.depth = width, depth
        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = ResBlock(c(64), c(128), c(128), stride=2)
        for i in range(1, blocks(3)):
            setattr(self, f"b2_{i}", ResBlock(c(128), c(128), c(128)))
        self.b3 = ResBlock(c(128), c(256), c(256), stride=2)
        for i in range(1, blocks(3)):
            setattr(self, f"b3_{i}", ResBlock(c(256), c(256), c(256)))
        self.b4 = ResBlock(c(256), c(512), c(512), stride=2)
        for i in range(1, blocks(6)):
            setattr(self, f"b4_{i}", ResBlock(c(512), c(512), c(512)))
        self.b5 = ResBlock(c(512), c(512), c(1024), stride=1, first_dilation=1, dilation=2)
        for i in range(1, blocks(3)):
            setattr(self, f"b5_{i}", ResBlock(c(1024), c(512), c(1024), dilation=2))
        self.b6 = ResBlockBottleneck(c(1024), c(2048), stride=1, dilation=4, dropout=dropout[0])
        self.b7 = ResBlockBottleneck(c(2048), c(4096), dilation=4, dropout=dropout[1])
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.out_channels = c(4096)
        self._stages = [name for name, _ in self.named_children() if name not in ("conv1a", "bn7")]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1a(x)
        for name in self._stages:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode and stop its affine parameters' gradients
    (RRM/PSA train with frozen BN: batches of 4 cannot estimate statistics)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Weight conversion and loading

_MX_BN = {"beta": "bias", "gamma": "weight", "mean": "running_mean", "var": "running_var"}


def convert_mxnet_resnet38(params: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Rename the MXNet ResNet-38 A1 ImageNet parameters to this module's (PSA's) state-dict keys.

    The weights are ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` (Wu, Shen, van den Hengel,
    "Wider or deeper"). Converting needs mxnet once, offline, on any machine::

        import mxnet, numpy as np, torch
        from rrm_cuda.rrm.model import convert_mxnet_resnet38
        raw = mxnet.nd.load("ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
        state = convert_mxnet_resnet38({k: v.asnumpy() for k, v in raw.items()})
        torch.save(state, "resnet38_a1_imagenet.pth")

    Key mapping (an ``arg:``/``aux:`` prefix is dropped first; PSA's ``convert_mxnet_to_torch``):

    - ``conv1a_weight`` -> ``conv1a.weight``
    - ``res{S}a_branch{B}_weight`` -> ``b{S}.conv_branch{B}.weight``;
      ``res{S}b{i}_branch{B}_weight`` -> ``b{S}_{i}.conv_branch{B}.weight``
    - ``bn{S}a_branch{B}_{gamma,beta,moving_mean,moving_var}`` ->
      ``b{S}.bn_branch{B}.{weight,bias,running_mean,running_var}`` (``bn{S}b{i}_…`` likewise)
    - ``bn7_{gamma,beta,moving_mean,moving_var}`` -> ``bn7.…``
    - ``linear1000_*`` (the ImageNet classifier) is dropped.

    Args:
        params: name -> numpy array, as ``{k: v.asnumpy() for k, v in mxnet.nd.load(f).items()}``.

    Returns:
        A state dict for :class:`ResNet38` (``load_state_dict(strict=False)``-ready: no
        ``num_batches_tracked``).
    """
    out: dict[str, Tensor] = {}
    for key, value in params.items():
        name = key.split(":", 1)[1] if ":" in key else key
        toks = name.split("_")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        head = toks[0]
        if head == "conv1a":
            out["conv1a.weight"] = tensor
        elif head.startswith("linear"):
            continue
        elif len(toks) > 1 and toks[1].startswith("branch"):
            prefix = head[3:] if head.startswith("res") else head[2:]  # "2a", "4b3"
            stage, rest = prefix[0], prefix[1:]
            block = f"b{stage}" if rest == "a" else f"b{stage}_{rest[1:]}"
            if head.startswith("res"):
                out[f"{block}.conv_{toks[1]}.weight"] = tensor
            elif head.startswith("bn"):
                out[f"{block}.bn_{toks[1]}.{_MX_BN[toks[-1]]}"] = tensor
            else:
                raise KeyError(f"unexpected MXNet ResNet-38 parameter name {key!r}")
        elif head == "bn7":
            out[f"bn7.{_MX_BN[toks[-1]]}"] = tensor
        else:
            raise KeyError(f"unexpected MXNet ResNet-38 parameter name {key!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Heads


class RFAM(nn.Module):
    r"""Global sub-branch: the re-weighted feature attention module (R-FAM) of RRM (PR 2022).

    ``Q, K, V = W_q F, W_k F, W_v F`` (1×1 convs C -> d), ``A = softmax_j(Q_iᵀ K_j)`` over the
    h·w positions, then the re-weighting (the paper's exact formula is not public; this one is ours)::

        τ = γ / N                               (N = h·w; γ = ``cap``, default 10)
        B_ij = min(A_ij, τ) · 1[A_ij ≥ 1/N]     (cap dominant weights, drop below-chance ones)
        A'_ij = B_ij + (1 − Σ_j B_ij) / N       (the removed mass goes to the global mean)

    Reasoning: unscaled dot products of 256-d projections of 4096-d features are large, so the
    softmax tends to be nearly one-hot — a single "dominant" key takes all the mass of a row and the
    global context degenerates to copying one position. Capping every weight at γ times the uniform
    weight 1/N bounds any key's share. Weights below the uniform 1/N are what a row spreads over
    unrelated positions ("noise" of the long tail summed over thousands of positions); they are
    dropped. The mass taken away is handed back uniformly, i.e. to the image's mean feature (global
    average pooling, the smoothest context there is), so rows stay stochastic and ``V·A'ᵀ`` stays a
    convex combination of the values. Renormalising the kept weights instead (dividing by
    ``Σ_j B_ij``, which can be as small as γ/N) makes a capped row one-hot again and amplifies the
    gradient up to N/γ-fold: on the embedded data it diverged within 20 iterations, this form did
    not. Every ∂A'/∂A entry is 0, 1 or −1/N. ``reweight=False`` gives plain softmax attention.

    The output ``concat(V·Aᵀ, V)`` (2d channels) is both the BCD feature and the input of
    conv3×3 2d->d/… -> relu -> conv3×3 -> K.

    forward: (B, C, h, w) -> (logits (B, K, h, w), features (B, 2d, h, w)).
    """

    def __init__(
        self,
        cin: int,
        dim: int = 256,
        num_classes: int = NUM_SEG_CLASSES,
        reweight: bool = True,
        cap: float = 10.0,
    ) -> None:
        super().__init__()
        self.reweight, self.cap = reweight, cap
        self.query = nn.Conv2d(cin, dim, 1)
        self.key = nn.Conv2d(cin, dim, 1)
        self.value = nn.Conv2d(cin, dim, 1)
        self.conv1 = nn.Conv2d(2 * dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, num_classes, 3, padding=1)

    def attention(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> A' (B, N, N), rows = queries, fp32."""
        q = self.query(x).flatten(2).float()
        k = self.key(x).flatten(2).float()
        a = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        if self.reweight:
            n = a.shape[-1]
            b = a.clamp(max=self.cap / n) * (a >= 1.0 / n)
            a = b + (1.0 - b.sum(-1, keepdim=True)) / n
        return a

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, _, h, w = x.shape
        v = self.value(x)
        a = self.attention(x).to(v.dtype)
        va = (v.flatten(2) @ a.transpose(1, 2)).reshape(v.shape)
        feats = torch.cat([va, v], dim=1)
        logits = self.conv2(F.relu(self.conv1(feats)))
        return logits, feats


class LocalBranch(nn.Module):
    """Local sub-branch: relu(conv3×3 dil12 C->dim) -> conv3×3 dil12 dim->K.

    forward: (B, C, h, w) -> (logits (B, K, h, w), features (B, dim, h, w))."""

    def __init__(self, cin: int, dim: int = 512, num_classes: int = NUM_SEG_CLASSES, dilation: int = 12) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, dim, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(dim, num_classes, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = F.relu(self.conv1(x))
        return self.conv2(feats), feats


class RRMOutput(NamedTuple):
    """cls_logits (B, 20); cam (B, 20, h, w) ReLU'd; seg (B, 21, h, w) logits; bcd_features
    (B, local_dim + 2·global_dim, h, w). A tuple, so DDP finds every output tensor."""

    cls_logits: Tensor
    cam: Tensor
    seg: Tensor
    bcd_features: Tensor


class RRM(nn.Module):
    """The one-step RRM network.

    Args:
        backbone: "resnet38" (4096-d conv6) or "small" (ResNet-38 at width 1/16, one block per
            stage: 256-d conv6, same stride 8) for CPU demos and tests.
        local_dim, global_dim: widths of the local branch (512) and of R-FAM's Q/K/V (256); the BCD
            features have ``local_dim + 2·global_dim`` channels (1024 for the real model).
        rfam_reweight: R-FAM's attention re-weighting (see :class:`RFAM`).
        freeze_bn: keep the backbone's BatchNorm frozen (statistics and affine).
        width, depth: backbone overrides (see :class:`ResNet38`).
        dropout: rate of the classifier's Dropout2d; the backbone's b6/b7 rates are PSA's 0.3/0.5
            scaled by ``dropout / 0.5``. Default 0.5 for "resnet38"; 0 for "small", a from-scratch
            network of 256 channels that dropout only slows down (measured on the embedded data).

    forward: (B, 3, H, W) normalised image -> :class:`RRMOutput` at stride 8.
    """

    def __init__(
        self,
        backbone: str = "resnet38",
        local_dim: int | None = None,
        global_dim: int | None = None,
        rfam_reweight: bool = True,
        freeze_bn: bool = True,
        width: float | None = None,
        depth: int | None = None,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if dropout is None:
            dropout = 0.0 if backbone == "small" else 0.5
        rates = (0.6 * dropout, dropout)
        if backbone == "resnet38":
            self.backbone = ResNet38(width if width is not None else 1.0, depth, rates)
            local_dim = 512 if local_dim is None else local_dim
            global_dim = 256 if global_dim is None else global_dim
        elif backbone == "small":
            self.backbone = ResNet38(width if width is not None else 1 / 16, 1 if depth is None else depth, rates)
            local_dim = 64 if local_dim is None else local_dim
            global_dim = 32 if global_dim is None else global_dim
        else:
            raise ValueError(f"backbone must be 'resnet38' or 'small'; got {backbone!r}")
        c = self.backbone.out_channels
        self.freeze_bn = freeze_bn
        # True: the segmentation losses train the segmentation branch only, not the backbone
        self.detach_seg_input = False
        self.dropout7 = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(c, NUM_CLASSES, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        self.local_branch = LocalBranch(c, local_dim)
        self.global_branch = RFAM(c, global_dim, reweight=rfam_reweight)
        self.bcd_channels = local_dim + 2 * global_dim
        for m in [*self.local_branch.modules(), *self.global_branch.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in (self.local_branch.conv2, self.global_branch.conv2):  # classifiers: DeepLab's N(0, 0.01)
            nn.init.normal_(m.weight, std=0.01)
        if freeze_bn:
            freeze_batchnorm(self.backbone)

    def new_layers(self) -> list[nn.Module]:
        """Layers trained from scratch (10×/20× learning rates): fc8 and the segmentation branch."""
        return [self.fc8, self.local_branch, self.global_branch]

    def train(self, mode: bool = True) -> RRM:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self

    def cam(self, features: Tensor) -> Tensor:
        """CAM = relu(conv(features, fc8.weight)): (B, C, h, w) -> (B, 20, h, w)."""
        return F.relu(F.conv2d(features, self.fc8.weight))

    def forward(self, x: Tensor) -> RRMOutput:
        feats = self.backbone(x)
        cls_logits = self.fc8(self.dropout7(feats)).mean((2, 3))
        seg_in = feats.detach() if self.detach_seg_input else feats
        local_logits, local_feats = self.local_branch(seg_in)
        global_logits, global_feats = self.global_branch(seg_in)
        seg = 0.5 * (local_logits + global_logits)
        return RRMOutput(cls_logits, self.cam(feats), seg, torch.cat([local_feats, global_feats], 1))

    def load_pretrained(self, path: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load a local torch state dict: PSA's ``res38_cls.pth`` (backbone keys at top level plus
        ``fc8.weight``), a :func:`convert_mxnet_resnet38` output, or a full RRM state dict.

        Returns (missing, unexpected) key lists of the non-strict load; raises FileNotFoundError
        naming the path, and ValueError if no key matched."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        state = load_state_file(path)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        own = self.state_dict()
        mapped: dict[str, Tensor] = {}
        unexpected: list[str] = []
        for key, v in state.items():
            k = key[len("module.") :] if key.startswith("module.") else key
            for cand in (k, f"backbone.{k}"):
                if cand in own:
                    if own[cand].shape != v.shape:
                        raise ValueError(
                            f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[cand].shape)}"
                        )
                    mapped[cand] = v
                    break
            else:
                unexpected.append(key)
        if not mapped:
            raise ValueError(f"{path}: no parameter name matched the RRM model (is it a ResNet-38 state dict?)")
        result = self.load_state_dict(mapped, strict=False)
        return list(result.missing_keys), unexpected


_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def load_state_file(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and Python values only, no code run
    from the file. Training checkpoints of this package written before session 18 held numpy's RNG
    state as an array: for them numpy's array types are allowed too (still no arbitrary code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the module that names _reconstruct in this numpy's pickles (numpy 1.26 also has a numpy._core,
        # a shim without multiarray until imported, whose functions are still numpy.core's)
        multiarray = importlib.import_module("numpy._core.multiarray" if _NUMPY_2 else "numpy.core.multiarray")
        # codecs.encode rebuilds the array's bytes; torch >= 2.5 allows it by default, 2.4 does not
        allowed = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals(allowed)  # torch 2.4: no context manager
        return torch.load(path, map_location="cpu", weights_only=True)


def output_size(size: int) -> int:
    """Feature-grid size for an input side of ``size`` pixels (three stride-2 3×3 convs, pad 1)."""
    for _ in range(3):
        size = (size - 1) // 2 + 1
    return size


def expected_feature_size(hw: Sequence[int]) -> tuple[int, int]:
    """(H, W) -> (h, w) of the stride-8 feature grid."""
    return output_size(hw[0]), output_size(hw[1])
