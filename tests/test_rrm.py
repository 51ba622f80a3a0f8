"""Tests of the RRM pipeline (rrm_cuda.rrm): model shapes and weight loading, reliable pseudo labels
vs a numpy/pydensecrf reference, losses, optimiser groups, data loading, metrics, and a tiny
train -> resume -> infer -> evaluate run on CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rrm_cuda
from rrm_cuda.rrm import (
    RRM,
    confusion_matrix,
    convert_mxnet_resnet38,
    iou_from_confusion,
    mean_iou,
    reliable_label_parts,
    reliable_labels,
)
from rrm_cuda.rrm import losses as L
from rrm_cuda.rrm.data import SyntheticScenes, VOCSegmentation, augment, labels_from_mask
from rrm_cuda.rrm.model import ResNet38, expected_feature_size
from rrm_cuda.rrm.pseudo_labels import multiscale_cam, normalize_cam
from rrm_cuda.rrm.reference_labels import compute_seg_label
from rrm_cuda.rrm.train import (
    PRESETS,
    TrainConfig,
    energy_settings_for_crop,
    make_config,
    param_groups,
    parse_config,
    poly_lr,
    train,
)

HAS_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Model


def test_small_model_shapes_stride8_and_bcd_width():
    torch.manual_seed(0)
    model = RRM("small", local_dim=24, global_dim=12).eval()
    for H, W in [(64, 72), (65, 33)]:
        out = model(torch.randn(2, 3, H, W))
        h, w = expected_feature_size((H, W))
        assert (h, w) == (-(-H // 8), -(-W // 8))
        assert out.cls_logits.shape == (2, 20)
        assert out.cam.shape == (2, 20, h, w) and bool((out.cam >= 0).all())
        assert out.seg.shape == (2, 21, h, w)
        assert out.bcd_features.shape == (2, 24 + 2 * 12, h, w)
    # CAM is relu(conv(conv6, fc8.weight)) and the classifier is its mean (without dropout in eval).
    x = torch.randn(1, 3, 40, 40)
    feats = model.backbone(x)
    out = model(x)
    torch.testing.assert_close(out.cam, F.relu(F.conv2d(feats, model.fc8.weight)))
    torch.testing.assert_close(out.cls_logits, F.conv2d(feats, model.fc8.weight).mean((2, 3)))


def test_resnet38_full_size_structure_on_meta():
    with torch.device("meta"):
        model = RRM("resnet38")
        out = model(torch.empty(1, 3, 321, 321))
    assert model.backbone.out_channels == 4096 and model.bcd_channels == 1024
    assert model.fc8.weight.shape == (20, 4096, 1, 1) and model.fc8.bias is None
    assert out.seg.shape == (1, 21, 41, 41) and out.bcd_features.shape == (1, 1024, 41, 41)
    bb = model.backbone
    assert bb.b5.conv_branch2a.dilation == (1, 1) and bb.b5.conv_branch2b1.dilation == (2, 2)
    assert bb.b6.conv_branch2b1.dilation == (4, 4) and bb.b7.conv_branch2b1.dilation == (4, 4)
    assert model.local_branch.conv1.dilation == (12, 12) and model.local_branch.conv2.dilation == (12, 12)
    assert model.global_branch.conv1.in_channels == 512 and model.global_branch.conv1.out_channels == 256
    # Frozen BN: no trainable BN parameter, BN in eval mode even after train().
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)


def _psa_to_mxnet(key: str) -> str:
    """Inverse of the documented mapping (PSA name -> MXNet name), to build a fake .params dict."""
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if key.startswith("bn7."):
        leaf = key.split(".")[1]
        return {
            "weight": "arg:bn7_gamma",
            "bias": "arg:bn7_beta",
            "running_mean": "aux:bn7_moving_mean",
            "running_var": "aux:bn7_moving_var",
        }[leaf]
    block, layer, leaf = key.split(".")
    stage, _, idx = block[1:].partition("_")
    tag = f"{stage}a" if not idx else f"{stage}b{idx}"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{tag}_{branch}_weight"
    mx = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}[leaf]
    return f"{'aux' if 'moving' in mx else 'arg'}:bn{tag}_{branch}_{mx}"


def test_mxnet_conversion_maps_every_key():
    ref = ResNet38(width=1 / 16)  # every block of the real network, few channels
    target = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    rng = np.random.default_rng(0)
    params = {_psa_to_mxnet(k): rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in target.items()}
    assert "arg:res4b5_branch2b1_weight" in params and "arg:res7a_branch2b2_weight" in params
    params["arg:linear1000_weight"] = np.zeros((1000, 4), np.float32)
    state = convert_mxnet_resnet38(params)
    assert set(state) == set(target)
    fresh = ResNet38(width=1 / 16)
    result = fresh.load_state_dict(state, strict=False)
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys) and not result.unexpected_keys
    for k in target:
        torch.testing.assert_close(fresh.state_dict()[k], torch.from_numpy(params[_psa_to_mxnet(k)]))
    with pytest.raises(KeyError, match="unexpected MXNet"):
        convert_mxnet_resnet38({"arg:foo_weight": np.zeros(1, np.float32)})


def test_load_pretrained_psa_names(tmp_path):
    src = RRM("small")
    psa = {k[len("backbone.") :]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    psa["fc8.weight"] = src.fc8.weight.detach().clone()
    torch.save(psa, tmp_path / "res38_cls.pth")
    dst = RRM("small")
    missing, unexpected = dst.load_pretrained(tmp_path / "res38_cls.pth")
    assert not unexpected and all(not k.startswith("backbone.") for k in missing)
    torch.testing.assert_close(dst.fc8.weight, src.fc8.weight)
    torch.testing.assert_close(dst.backbone.b7.conv_branch1.weight, src.backbone.b7.conv_branch1.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dst.load_pretrained(tmp_path / "nope.pth")
    # a DataParallel / DDP state dict ("module." prefixes) with one key the model lacks
    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}
    wrapped["module.extra.weight"] = torch.zeros(2)
    torch.save(wrapped, tmp_path / "ddp.pth")
    missing, unexpected = RRM("small").load_pretrained(tmp_path / "ddp.pth")
    assert missing == [] and unexpected == ["module.extra.weight"]


def test_rfam_reweighting():
    torch.manual_seed(0)
    model = RRM("small")
    feats = torch.randn(2, model.backbone.out_channels, 6, 5) * 3
    n, cap = 30, model.global_branch.cap
    with torch.no_grad():
        a = model.global_branch.attention(feats)
        q, k = model.global_branch.query(feats).flatten(2), model.global_branch.key(feats).flatten(2)
        raw = torch.softmax(q.transpose(1, 2) @ k, -1)
        assert float(raw.amax()) > cap / n  # the cap is active on these inputs
        b = raw.clamp(max=cap / n) * (raw >= 1.0 / n)
        want = b + (1 - b.sum(-1, keepdim=True)) / n  # by hand, the docstring's formula
        torch.testing.assert_close(a, want)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, n))
        share = (1 - b.sum(-1, keepdim=True)) / n
        assert bool((a <= cap / n + share + 1e-6).all()) and bool((a >= share - 1e-7).all())
        assert float(a.amax()) < float(raw.amax())  # the dominant weight was cut
        model.global_branch.reweight = False
        torch.testing.assert_close(model.global_branch.attention(feats), raw)


# ---------------------------------------------------------------------------------------------
# Pseudo labels


def _fixed_inputs(B=3, H=40, W=48):
    from skimage import data
    from skimage.transform import resize

    photo = (resize(data.astronaut(), (H, W)) * 255).astype(np.uint8)
    imgs = np.stack([photo, photo[::-1].copy(), photo[:, ::-1].copy()])[:B]
    g = torch.Generator().manual_seed(0)
    cams = F.interpolate(torch.rand(B, 20, H // 8, W // 8, generator=g) ** 3, (H, W), mode="bilinear")
    labels = torch.zeros(B, 20)
    labels[0, [2, 7]] = 1
    labels[1, 14] = 1
    labels[2, [0, 5, 9]] = 1
    return imgs, normalize_cam(cams, labels), labels


def _our_crf(img, probs, n_labels):
    q = rrm_cuda.dense_crf(
        probs=torch.from_numpy(probs).float()[None],
        image=torch.from_numpy(img).permute(2, 0, 1)[None].float(),
    )
    return q[0].double().numpy()


def test_reliable_labels_match_reference_logic_exactly():
    """Same CRF on both sides: the batched torch implementation (padding, scatter, percentile,
    thresholds) equals the transcription of the original line by line."""
    imgs, cams, labels = _fixed_inputs()
    out = reliable_labels(torch.from_numpy(imgs).permute(0, 3, 1, 2), cams, labels)
    for b in range(imgs.shape[0]):
        ref = compute_seg_label(imgs[b], labels[b].numpy(), cams[b].numpy(), crf=_our_crf)
        np.testing.assert_array_equal(out[b].numpy(), ref)
    values = set(np.unique(out.numpy()).tolist())
    assert {0, 255} < values  # background, unlabelled and some foreground class


@pytest.mark.skipif(not HAS_PYDENSECRF, reason="pydensecrf2 not installed")
def test_reliable_labels_match_pydensecrf_reference():
    imgs, cams, labels = _fixed_inputs()
    out = reliable_labels(torch.from_numpy(imgs).permute(0, 3, 1, 2), cams, labels).numpy()
    for b in range(imgs.shape[0]):
        ref = compute_seg_label(imgs[b], labels[b].numpy(), cams[b].numpy())
        agree = (out[b] == ref).mean()
        assert agree >= 0.995, f"image {b}: {agree:.4f} of pixels agree with pydensecrf"
        assert set(np.unique(ref)) == set(np.unique(out[b]))


def test_channel_argmax_equals_argmax_with_ties():
    from rrm_cuda.rrm.pseudo_labels import _channel_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 21, 9, 7), generator=g).float()  # many ties: the first maximum wins
    assert torch.equal(_channel_argmax(x), x.argmax(1))
    x = torch.rand(2, 5, 4, 4, generator=g)
    assert torch.equal(_channel_argmax(x), x.argmax(1))


def test_cam_sure_batched_formulation_equals_per_class_loop():
    """The GPU's batched, synchronisation-free CAM-reliable region equals the per-(image, class) loop
    (percentile index, ties, classes absent from the CRF label, a class without CAM > 0.1)."""
    from rrm_cuda.rrm.pseudo_labels import _cam_sure

    g = torch.Generator().manual_seed(4)
    B, H, W = 3, 11, 13
    cam = (torch.rand(B, 21, H, W, generator=g) * 10).round() / 10  # many equal values
    present = torch.zeros(B, 20, dtype=torch.bool)
    present[0, [2, 7, 9]] = True
    present[1, 4] = True  # image 2: no class
    cam[:, 1:] *= present[:, :, None, None]
    cam[0, 10] = 0.05  # class 9 present but never above 0.1
    cam_img = cam.argmax(1)
    la = cam_img.clone()
    la[0][la[0] == 8] = 0  # class 7 absent from the CRF label of image 0
    for p in (0.6, 0.0, 0.95, 0.999):  # 0.999: the last selected value (k = n - 1)
        for bg_t, cmin in ((0.8, 0.1), (-1.0, 0.0), (0.8, -0.5), (-0.2, -0.1)):
            args = (cam, cam_img, la, present, bg_t, cmin, p)
            loop = _cam_sure(*args, vectorised=False)
            torch.testing.assert_close(_cam_sure(*args, vectorised=True), loop)
    default = _cam_sure(cam, cam_img, la, present, 0.8, 0.1, 0.6, vectorised=False)
    assert bool(default.any()) and not bool(default.all())


def test_reliable_label_parts_gpu_formulations_equal_cpu_ones(monkeypatch):
    """The GPU's batched CAM-reliable region and ATen argmax give the CPU path's results bit for bit;
    absent classes' CRF probabilities are exactly 0 (padding labels' Q is zeroed before the scatter)."""
    from rrm_cuda.rrm import pseudo_labels as PL

    g = torch.Generator().manual_seed(2)
    B, S = 4, 23
    image = torch.randint(0, 256, (B, 3, S, S), generator=g).to(torch.uint8)
    labels = torch.zeros(B, 20)
    for b, n in enumerate((1, 2, 0, 3)):  # padding labels for 3 images, one without a class
        labels[b, torch.randperm(20, generator=g)[:n]] = 1
    cams = (torch.rand(B, 20, S, S, generator=g) * 10).round() / 10 * labels[:, :, None, None]
    cpu = reliable_label_parts(image, cams, labels, iterations=3)
    cam_sure = PL._cam_sure
    monkeypatch.setattr(PL, "_cam_sure", lambda *a, **k: cam_sure(*a, **{**k, "vectorised": True}))
    monkeypatch.setattr(PL, "_channel_argmax", lambda x: x.argmax(1))
    gpu = reliable_label_parts(image.float(), cams, labels, iterations=3)
    for f in ("label", "crf_label", "cam_sure", "crf_la", "crf_ha"):
        assert torch.equal(getattr(cpu, f), getattr(gpu, f)), f
    absent = torch.cat([torch.zeros(B, 1, dtype=torch.bool), labels == 0], 1)
    for q in (cpu.crf_la, cpu.crf_ha):
        assert bool((q.permute(0, 2, 3, 1)[absent[:, None, None].expand(-1, S, S, -1)] == 0).all())
        assert not bool(torch.signbit(q).any())
        assert q.is_contiguous()


def test_reliable_label_parts_without_probabilities(cuda_or_cpu):
    """probabilities=False (the training step's and reliable_labels' call) leaves out the two
    (B, 21, H, W) CRF probability tensors and gives every label bit for bit, with padding labels, an
    image without a class and a batch where no image has one."""
    g = torch.Generator().manual_seed(7)
    B, S = 4, 19
    dev = cuda_or_cpu
    image = torch.randint(0, 256, (B, 3, S, S), generator=g).to(torch.uint8).to(dev)
    labels = torch.zeros(B, 20)
    for b, n in enumerate((2, 0, 1, 3)):
        labels[b, torch.randperm(20, generator=g)[:n]] = 1
    cams = ((torch.rand(B, 20, S, S, generator=g) * 10).round() / 10 * labels[:, :, None, None]).to(dev)
    parts = []
    for lab in (labels, torch.zeros_like(labels)):
        full = reliable_label_parts(image, cams * lab.to(dev)[:, :, None, None], lab, iterations=3)
        lean = reliable_label_parts(image, cams * lab.to(dev)[:, :, None, None], lab, iterations=3, probabilities=False)
        assert lean.crf_la is None and lean.crf_ha is None
        for f in ("label", "crf_label", "cam_sure"):
            assert torch.equal(getattr(lean, f), getattr(full, f)), f
        assert torch.equal(reliable_labels(image, cams * lab.to(dev)[:, :, None, None], lab, iterations=3), full.label)
        # the label restated from the returned parts: confidence = max(α=32 background, α=4 foreground)
        confidence = torch.maximum(full.crf_ha[:, 0], full.crf_la[:, 1:].amax(1))
        want = full.crf_label.masked_fill((confidence < 0.8) | ~full.cam_sure, 255)
        assert torch.equal(full.label, want)
        parts.append(full)
    # A threshold between the two confidences at a labelled, CAM-reliable pixel: there the α=4
    # background in place of the α=32 one would change the label.
    full = parts[0]
    conf_ha = torch.maximum(full.crf_ha[:, 0], full.crf_la[:, 1:].amax(1))
    conf_la = torch.maximum(full.crf_la[:, 0], full.crf_la[:, 1:].amax(1))
    where = (full.crf_label != 255) & full.cam_sure & (conf_ha != conf_la)
    assert bool(where.any())
    t = float((conf_ha[where][0] + conf_la[where][0]) / 2)
    for probabilities in (True, False):
        got = reliable_label_parts(
            image,
            cams * labels.to(dev)[:, :, None, None],
            labels,
            iterations=3,
            crf_threshold=t,
            probabilities=probabilities,
        ).label
        assert torch.equal(got, full.crf_label.masked_fill((conf_ha < t) | ~full.cam_sure, 255))
        assert not torch.equal(got, full.crf_label.masked_fill((conf_la < t) | ~full.cam_sure, 255))


def test_reliable_labels_unchecked_equal_checked_and_host_labels(cuda_or_cpu):
    """check_inputs=False reads nothing back and gives the same labels; labels on the host (as the
    training step passes them) give the same labels as labels on the CAMs' device."""
    g = torch.Generator().manual_seed(4)
    B, S = 3, 21
    image = torch.randint(0, 256, (B, 3, S, S), generator=g).to(torch.uint8)
    labels = torch.zeros(B, 20)
    for b, n in enumerate((1, 2, 3)):
        labels[b, torch.randperm(20, generator=g)[:n]] = 1
    cams = (torch.rand(B, 20, S, S, generator=g) * 10).round() / 10 * labels[:, :, None, None]
    dev = cuda_or_cpu
    ref = reliable_label_parts(image.to(dev), cams.to(dev), labels.to(dev), iterations=3)
    for lab, check in ((labels.to(dev), False), (labels, True), (labels, False)):
        got = reliable_label_parts(image.to(dev), cams.to(dev), lab, iterations=3, check_inputs=check)
        for f in ("label", "crf_label", "cam_sure", "crf_la", "crf_ha"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), f
    c0 = int(labels[0].nonzero()[0, 0])  # a class of image 0
    bad = cams.clone()
    bad[0, c0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cams contains NaN values in a present class"):
        reliable_labels(image.to(dev), bad.to(dev), labels, iterations=3)
    reliable_labels(image.to(dev), bad.to(dev), labels, iterations=3, check_inputs=False)  # no error
    bad[0, c0, 0, 0] = float("inf")  # Inf would pass the CRF's checks (clipped into its unary)
    with pytest.raises(ValueError, match="cams contains Inf values in a present class"):
        reliable_labels(image.to(dev), bad.to(dev), labels, iterations=3)
    # an absent class's CAM is never read, NaN included (as in the original, which reads present ones)
    absent = cams.clone()
    absent[labels == 0] = float("nan")
    got = reliable_label_parts(image.to(dev), absent.to(dev), labels, iterations=3)
    for f in ("label", "crf_label", "cam_sure", "crf_la", "crf_ha"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    for kw, msg in (
        (dict(alphas=(4.0, 32.0, 8.0)), "alphas must be two positive numbers"),
        (dict(alphas=(4.0, -1.0)), "alphas must be two positive numbers"),
        (dict(cam_percentile=1.0), r"cam_percentile must be a number in \[0, 1\)"),
        (dict(cam_percentile=-0.1), r"cam_percentile must be a number in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            reliable_labels(image.to(dev), cams.to(dev), labels, iterations=3, **kw)


def test_train_step_stops_on_non_finite_cams(tmp_path, monkeypatch):
    """The step's pseudo labels are unchecked (no extra host read): its one host read checks the
    CAMs instead, and a diverged network stops training with a clear error."""
    import rrm_cuda.rrm.train as T

    real = T.multiscale_cam

    def nan_cam(*a, **k):
        c = real(*a, **k)
        c[0, 0, 0, 0] = float("nan")
        return c

    monkeypatch.setattr(T, "multiscale_cam", nan_cam)
    with pytest.raises(FloatingPointError, match="non-finite CAMs"):
        train(_tiny(tmp_path, "nan", eval_at_end=False, warmup_cls_iterations=0, seg_head_only_iterations=0))


def test_reliable_labels_class_without_cam_pixel_and_no_class():
    """The original raises IndexError when a class has no CAM value > 0.1: here it gets no label."""
    H = W = 24
    image = torch.zeros(2, 3, H, W)
    image[0, :, 6:18, 6:18] = 220
    cams = torch.zeros(2, 20, H, W)
    cams[0, 4, 6:18, 6:18] = torch.linspace(0.3, 1.0, 12)[:, None]
    cams[0, 11] = 0.05  # present, but never above 0.1
    labels = torch.zeros(2, 20)
    labels[0, [4, 11]] = 1  # image 1: no class at all
    parts = reliable_label_parts(image, cams, labels)
    assert not bool((parts.label[0] == 12).any()) and bool((parts.label[0] == 5).any())
    assert bool((parts.label[1] == 0).all())
    ref = compute_seg_label(
        image[0].permute(1, 2, 0).numpy().astype(np.uint8), labels[0].numpy(), cams[0].numpy(), crf=_our_crf
    )
    np.testing.assert_array_equal(parts.label[0].numpy(), ref)
    with pytest.raises(ValueError, match="cams must have shape"):
        reliable_labels(image, cams[:, :5], labels)


def test_multiscale_cam_normalised_and_label_masked():
    torch.manual_seed(0)
    model = RRM("small").eval()
    images = torch.randn(2, 3, 48, 40)
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, [1, 6]] = 1
    cams = multiscale_cam(model, images, labels, (48, 40))
    assert cams.shape == (2, 20, 48, 40) and not cams.requires_grad
    assert bool((cams[labels == 0] == 0).all())
    with torch.no_grad():  # by hand: scale-1 grid, average, upsample, mask, max-normalise (+1e-5)
        c1 = model.cam(model.backbone(images))
        grid = c1.shape[2:]
        acc = c1.clone()
        for s in (0.5, 1.5, 2.0):
            xs = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            acc += F.interpolate(model.cam(model.backbone(xs)), grid, mode="bilinear", align_corners=False)
        up = F.interpolate(acc / 4, (48, 40), mode="bilinear", align_corners=False) * labels[:, :, None, None]
        want = up / (up.flatten(2).amax(2)[:, :, None, None] + 1e-5)
    torch.testing.assert_close(cams, want)
    assert float(cams.max()) < 1.0
    with pytest.raises(ValueError, match="must contain 1.0"):
        multiscale_cam(model, images, labels, (48, 40), scales=(0.5, 2.0))


# ---------------------------------------------------------------------------------------------
# Losses and optimiser


def test_seg_ce_losses_split_background_foreground():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 5, 6)
    label = torch.randint(0, 21, (2, 5, 6))
    label[0, :2] = 0
    label[1, 3:] = 255
    bg, fg = L.seg_ce_losses(logits, label)
    ce = F.cross_entropy(logits, label.clamp(max=20), reduction="none")
    torch.testing.assert_close(bg, ce[label == 0].mean())
    torch.testing.assert_close(fg, ce[(label > 0) & (label < 255)].mean())
    bg0, fg0 = L.seg_ce_losses(logits, torch.full_like(label, 255))
    assert float(bg0) == 0.0 and float(fg0) == 0.0


def test_missing_loss_ops_raise_clear_errors(monkeypatch):
    monkeypatch.delattr(rrm_cuda, "DenseEnergyLoss", raising=False)
    monkeypatch.delattr(rrm_cuda, "bcd_loss", raising=False)
    with pytest.raises(RuntimeError, match="DenseEnergyLoss.*--energy-weight 0"):
        L.check_available(energy=True, bcd=False)
    with pytest.raises(RuntimeError, match="bcd_loss.*--bcd-weight 0"):
        L.bcd_loss(torch.zeros(1, 21, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(RuntimeError, match="DenseEnergyLoss"):
        train(make_config("cpu-demo", energy_weight=1e-7, out_dir="/nonexistent/never-created"))


def test_param_groups_and_poly_lr():
    cfg = make_config("cpu-demo", lr=0.1, weight_decay=1e-3)
    frozen = param_groups(RRM("small", freeze_bn=True), cfg)  # bias-free convs, frozen BN: no 2x group
    assert [g["lr_mult"] for g in frozen] == [1.0, 10.0, 20.0]
    model = RRM("small", freeze_bn=False)
    groups = param_groups(model, cfg)
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 10.0, 20.0]
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0, 1e-3, 0.0]
    new = {id(p) for m in model.new_layers() for p in m.parameters()}
    assert all(id(p) not in new and p.dim() > 1 for p in groups[0]["params"])
    assert {id(p) for p in groups[2]["params"] + groups[3]["params"]} == new
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.7)
    lr = poly_lr(opt, 0.1, 50, 100, 0.9)
    assert lr == pytest.approx(0.1 * 0.5**0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, 2 * lr, 10 * lr, 20 * lr])
    assert all(g["momentum"] == 0.7 for g in opt.param_groups)


def test_energy_settings_carried_over_to_the_crop():
    assert energy_settings_for_crop(321) == pytest.approx({"energy_weight": 1e-7, "energy_sigma_xy": 100.0})
    small = energy_settings_for_crop(64)
    assert small["energy_sigma_xy"] == pytest.approx(100 * 64 / 321)
    assert small["energy_weight"] == pytest.approx(1e-7 * (321 / 64) ** 4)
    cfg = make_config("cpu-demo")
    assert (cfg.energy_weight, cfg.energy_sigma_xy) == pytest.approx(tuple(energy_settings_for_crop(cfg.crop).values()))
    # the papers' settings at 321-px crops (RRM's train script: weight 1e-7, sigma_rgb 15, sigma_xy 100, scale 0.5)
    for cfg in [TrainConfig()] + [make_config(p) for p in PRESETS if make_config(p).crop == 321]:
        assert (cfg.energy_weight, cfg.energy_sigma_rgb, cfg.energy_sigma_xy, cfg.energy_scale) == (
            1e-7,
            15.0,
            100.0,
            0.5,
        )
    assert make_config("cpu-demo").energy_sigma_rgb == 15.0 and make_config("cpu-demo").energy_scale == 0.5


def test_cli_presets_and_overrides():
    cfg = parse_config([])
    assert cfg.backbone == "small" and cfg.data == "embedded"
    cfg = parse_config(["--preset", "aaai", "--momentum", "1e-5", "--cam-scales", "1", "0.5", "--no-amp"])
    assert (cfg.batch_size, cfg.crop, cfg.lr, cfg.weight_decay, cfg.iterations) == (4, 321, 7e-4, 1e-5, 20000)
    assert cfg.momentum == 1e-5 and cfg.cam_scales == (1.0, 0.5) and cfg.amp is False
    pr = parse_config(["--preset", "pr2022"])
    assert (pr.batch_size, pr.lr, pr.iterations, pr.energy_weight, pr.bcd_weight) == (
        8,
        1e-3,
        40000,
        1e-7,
        1.0,
    )


# ---------------------------------------------------------------------------------------------
# Data


def _write_voc(root, n=3, corrupt=None):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        mask = np.zeros((30, 40), np.uint8)
        mask[5:20, 10:30] = 3 + k
        mask[0, 0] = 255
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{i}.png")
        path = root / "JPEGImages" / f"{i}.jpg"
        if k == corrupt:
            path.write_bytes(b"not a jpeg at all")
        else:
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_voc_loader_labels_from_masks_and_augmentation(tmp_path):
    ids = _write_voc(tmp_path / "VOC2012")
    ds = VOCSegmentation(tmp_path / "VOC2012", "train", crop=48, seed=1)
    s = ds[1]
    assert s["image"].shape == (3, 48, 48) and s["raw"].dtype == torch.uint8 and s["mask"].shape == (48, 48)
    assert s["name"] == ids[1] and s["labels"].nonzero().flatten().tolist() == [3]
    roi = s["roi"].bool()
    assert bool((s["mask"][~roi] == 255).all()) and bool((s["image"][:, ~roi] == 0).all())
    # RRM's raw padding: its zero-padded normalised crop de-normalised to uint8
    pad = torch.tensor([int((0 * sd + m) * 255) for m, sd in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))])
    assert bool((s["raw"][:, ~roi] == pad[:, None].to(torch.uint8)).all())
    assert 0.2 < float(s["roi"].mean()) < 1.0  # 30x40 rescaled by 0.7-1.3 inside a 48 crop: padded
    torch.testing.assert_close(ds[1]["raw"], s["raw"])  # same epoch, same item: same crop
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["raw"], s["raw"])
    ev = VOCSegmentation(tmp_path / "VOC2012", "train", crop=None)
    assert ev[0]["mask"].shape == (30, 40) and bool((ev[0]["roi"] == 1).all())


def test_voc_loader_missing_paths_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC root folder not found: .*nowhere"):
        VOCSegmentation(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty" / "JPEGImages"))):
        VOCSegmentation(tmp_path / "empty")
    _write_voc(tmp_path / "VOC2012")
    with pytest.raises(FileNotFoundError, match="image list not found: .*train_aug.txt"):
        VOCSegmentation(tmp_path / "VOC2012", "train_aug")
    with pytest.raises(FileNotFoundError, match="class label file not found: .*cls.npy"):
        VOCSegmentation(tmp_path / "VOC2012", "train", cls_labels=tmp_path / "cls.npy")
    (tmp_path / "VOC2012" / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000001.jpg"):
        VOCSegmentation(tmp_path / "VOC2012", "train")


def test_voc_loader_skips_corrupt_image_with_warning(tmp_path):
    ids = _write_voc(tmp_path / "VOC2012", n=3, corrupt=1)
    ds = VOCSegmentation(tmp_path / "VOC2012", "train", crop=32)
    with pytest.warns(RuntimeWarning, match=f"skipping unreadable sample {ids[1]}: image .*{ids[1]}.jpg"):
        s = ds[1]
    assert s["name"] == ids[2]
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [n for b in loader for n in b["name"]]
    assert names == [ids[0], ids[2], ids[2]]


def test_voc_evaluation_never_substitutes_an_image(tmp_path):
    # Evaluation and inference (crop=None) used to take the next image in place of one whose mask was
    # missing or unreadable, scoring that one twice. Now: missing masks are named when the dataset is
    # made, a bad mask or an undecodable image raises, and masks=False reads images without ground truth.
    root = tmp_path / "VOC2012"
    ids = _write_voc(root, n=4)
    (root / "SegmentationClass" / f"{ids[1]}.png").unlink()
    (root / "SegmentationClass" / f"{ids[3]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"mask listed in train not found: .*{ids[1]}.png \(and 1 more\)"):
        VOCSegmentation(root, "train", crop=None)
    ev = VOCSegmentation(root, "train", crop=None, masks=False)  # inference: no ground truth needed
    assert [ev[i]["name"] for i in range(4)] == ids
    assert bool((ev[1]["mask"] == 255).all()) and bool((ev[0]["mask"] == 255).all())
    # training without cls_labels.npy: the labels come from the masks, so each image needs one
    with pytest.raises(FileNotFoundError, match=rf"no image-level labels for {ids[1]} \(and 1 more"):
        VOCSegmentation(root, "train", crop=32)
    np.save(root / "cls_labels.npy", {i: np.eye(20, dtype=np.float32)[k] for k, i in enumerate(ids)})
    tr = VOCSegmentation(root, "train", crop=32)  # labels from cls_labels.npy; mask all 255
    assert tr[1]["labels"].nonzero().flatten().tolist() == [1] and bool((tr[1]["mask"] == 255).all())
    assert tr[0]["labels"].nonzero().flatten().tolist() == [0] and int((tr[0]["mask"] == 3).sum()) > 0
    # a mask of the wrong size, or an undecodable image, in evaluation: an error naming it
    root2 = tmp_path / "b" / "VOC2012"
    ids2 = _write_voc(root2, n=3, corrupt=2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root2 / "SegmentationClass" / f"{ids2[0]}.png")
    ev2 = VOCSegmentation(root2, "train", crop=None)
    with pytest.raises(RuntimeError, match=rf"mask .*{ids2[0]}.png has shape \(10, 10\), image \(30, 40\)"):
        ev2[0]
    assert ev2[1]["name"] == ids2[1]
    with pytest.raises(RuntimeError, match=rf"image .*{ids2[2]}.jpg cannot be decoded.*would be scored twice"):
        ev2[2]
    # in training the same two are skipped with a warning, never a crash mid-epoch
    tr2 = VOCSegmentation(root2, "train", crop=16)
    with pytest.warns(RuntimeWarning, match=rf"skipping unreadable sample {ids2[0]}: mask .* has shape"):
        assert tr2[0]["name"] == ids2[1]
    with pytest.warns(RuntimeWarning, match=rf"skipping unreadable sample {ids2[2]}: image"):
        assert tr2[2]["name"] == ids2[1]


def test_train_config_rejects_bad_values_at_start(monkeypatch):
    from rrm_cuda.rrm.train import make_config, resolve_device

    with pytest.raises(ValueError, match=r"cam_scales must be positive and contain 1.0.*got \(0.5, 1.5\)"):
        make_config("cpu-demo", cam_scales=(0.5, 1.5))
    with pytest.raises(ValueError, match="log_every must be >= 0"):
        make_config("cpu-demo", log_every=-1)
    assert make_config("cpu-demo", checkpoint_every=0, log_every=0).checkpoint_every == 0
    for name, value, low in (("batch_size", 0, 1), ("crop", 1, 16), ("iterations", -1, 0), ("workers", -2, 0)):
        with pytest.raises(ValueError, match=f"{name} must be >= {low}; got {value}"):
            make_config("cpu-demo", **{name: value})
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda") == torch.device("cuda", 3)  # a torchrun process's own GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible GPU per process
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu").type == "cpu"


def test_scripts_refuse_a_limit_below_one(capsys):
    # --limit 0 evaluated no image and reported mIoU nan with exit code 0: now a usage error
    from rrm_cuda.rrm import evaluate, infer

    for mod, args in ((infer, ["--checkpoint", "x.pt", "--out", "o"]), (evaluate, ["--pred", "p", "--out", "o"])):
        for bad in ("0", "-3", "two"):
            with pytest.raises(SystemExit) as e:
                mod.build_parser().parse_args([*args, "--limit", bad])
            assert e.value.code == 2 and "--limit: expected an integer >= 1" in capsys.readouterr().err
        assert mod.build_parser().parse_args([*args, "--limit", "2"]).limit == 2


def test_pipeline_dependencies_named_with_the_install_command(monkeypatch):
    import importlib.util

    from rrm_cuda.rrm import _deps, train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in ("tqdm", "skimage") else real(m, *a))
    with pytest.raises(ImportError, match=r"needs skimage, tqdm: pip install 'rrm_cuda\[rrm\]'.*scikit-image tqdm"):
        train.main(["--iterations", "1"])
    _deps.require("numpy", "torch")  # present: no error


def test_augment_and_labels_from_mask():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
    mask = np.zeros((50, 60), np.uint8)
    mask[10:20, 10:20] = 15
    a = augment(raw, mask, rng, crop=40)
    assert a["raw"].shape == (40, 40, 3) and a["mask"].shape == (40, 40) and a["roi"].shape == (40, 40)
    assert set(np.unique(a["mask"])) <= {0, 15, 255}
    assert labels_from_mask(np.array([[0, 15, 255], [1, 20, 0]])).nonzero()[0].tolist() == [0, 14, 19]


def test_embedded_dataset_deterministic_with_ground_truth():
    a, b = (
        SyntheticScenes("train", 4, (48, 48), crop=None, seed=3),
        SyntheticScenes("train", 4, (48, 48), None, 3),
    )
    v = SyntheticScenes("val", 4, (48, 48), None, 3)
    for i in range(4):
        torch.testing.assert_close(a[i]["raw"], b[i]["raw"])
        assert not torch.equal(a[i]["raw"], v[i]["raw"])
        s = a[i]
        assert s["labels"].sum() >= 1
        present = {c + 1 for c in s["labels"].nonzero().flatten().tolist()}
        assert present == set(np.unique(s["mask"].numpy())) - {0}


# ---------------------------------------------------------------------------------------------
# Metrics


def test_confusion_matrix_and_miou_hand_computed():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]])
    conf = confusion_matrix(pred, gt, num_classes=3)
    # pixels kept: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); gt 255 and pred 255 dropped
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    iou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    conf21 = confusion_matrix(torch.tensor([[0, 5], [5, 5]]), torch.tensor([[0, 5], [0, 5]]))
    assert conf21.shape == (21, 21) and conf21[0, 0] == 1 and conf21[0, 5] == 1 and conf21[5, 5] == 2
    iou21 = iou_from_confusion(conf21)
    assert np.isnan(iou21[1]) and mean_iou(conf21) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------------------------------------
# End to end


def _tiny(tmp_path, name, **kw):
    base = dict(
        backbone="small",
        data="embedded",
        train_length=6,
        val_length=2,
        image_size=40,
        crop=32,
        batch_size=2,
        iterations=4,
        warmup_cls_iterations=2,
        seg_head_only_iterations=1,
        lr=0.01,
        freeze_bn=False,
        cam_scales=(1.0, 0.5),
        crf_iterations=3,
        workers=0,
        threads=1,
        energy_weight=0.0,
        bcd_weight=0.0,
        checkpoint_every=100,
        panel_every=3,
        log_every=1,
        progress=False,
        out_dir=str(tmp_path / name),
    )
    base.update(kw)
    return make_config("cpu-demo", **base)


def test_seg_head_only_stage_detaches_the_backbone(tmp_path, monkeypatch):
    import rrm_cuda.rrm.train as T

    model = RRM("small", freeze_bn=False)
    x = torch.randn(2, 3, 32, 32)
    for detach in (True, False):
        model.zero_grad(set_to_none=True)
        model.detach_seg_input = detach
        out = model(x)
        (out.seg.square().mean() + out.bcd_features.square().mean()).backward()
        assert all((p.grad is None) == detach for p in model.backbone.parameters())
        assert all(p.grad is not None for m in (model.local_branch, model.global_branch) for p in m.parameters())
    # the loop: classification warm-up (2), segmentation branch only (1), end to end (1)
    flags = []
    step = T.train_step

    def spy(net, model, *args, **kwargs):
        flags.append(model.detach_seg_input)
        return step(net, model, *args, **kwargs)

    monkeypatch.setattr(T, "train_step", spy)
    train(_tiny(tmp_path, "run", eval_at_end=False))
    assert flags == [True, True, True, False]


def test_train_infer_evaluate_end_to_end(tmp_path, capsys):
    from rrm_cuda.rrm import evaluate, infer

    result = train(_tiny(tmp_path, "run"))
    out = tmp_path / "run"
    assert result["iteration"] == 4
    for k in ("miou_cam", "miou_reliable", "miou_seg", "miou_seg_crf"):
        assert 0.0 <= result[k] <= 100.0
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,lr,loss") and len(log) == 5
    rows = [dict(zip(log[0].split(","), map(float, line.split(",")))) for line in log[1:]]
    assert all(r["ce_bg"] == r["ce_fg"] == r["labelled"] == 0 for r in rows[:2])  # classification warm-up
    assert all(r["labelled"] > 0 and r["ce_bg"] + r["ce_fg"] > 0 for r in rows[2:])  # pseudo-label phase
    assert all(r["loss"] == pytest.approx(r["cls"] + r["ce_bg"] + r["ce_fg"], rel=1e-5) for r in rows)
    assert (out / "panels" / "iter_000003.png").is_file() and (out / "model_final.pt").is_file()
    printed = capsys.readouterr().out
    assert "segmentation branch mIoU" in printed and "segmentation + dense CRF" in printed

    names = infer.run_inference(out / "model_final.pt", tmp_path / "pred", crf=True, scales=(1.0, 0.5), flip=True)
    assert len(names) == 2
    with Image.open(tmp_path / "pred" / f"{names[0]}.png") as im:
        assert im.mode == "P" and im.size == (40, 40)
    assert evaluate.main(["--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "eval")]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "background" in text
    conf = np.loadtxt(tmp_path / "eval" / "confusion.csv", delimiter=",", skiprows=1, usecols=range(1, 22))
    assert conf.shape == (21, 21) and conf.sum() == 2 * 40 * 40
    assert (tmp_path / "eval" / "confusion.png").is_file()
    assert (
        evaluate.main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--image-size",
                "40",
                "--length",
                "2",
                "--out",
                str(tmp_path / "eval2"),
            ]
        )
        == 0
    )
    assert "mIoU" in capsys.readouterr().out
    assert infer.main(["--checkpoint", str(out / "model_final.pt"), "--out", str(tmp_path / "p1"), "--limit", "1"]) == 0
    assert "wrote 1 masks" in capsys.readouterr().out and (tmp_path / "p1" / f"{names[0]}.png").is_file()
    # without data flags: the data rrm-infer recorded beside its masks (here the run's 40 px, 2 images)
    assert json.loads((tmp_path / "pred" / "dataset.json").read_text())["image_size"] == 40
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "eval3")]) == 0
    conf3 = np.loadtxt(tmp_path / "eval3" / "confusion.csv", delimiter=",", skiprows=1, usecols=range(1, 22))
    assert conf3.sum() == 2 * 40 * 40
    # flags given with --checkpoint choose the predicted images and their ground truth alike
    args = ["--checkpoint", str(out / "model_final.pt"), "--seed", "7", "--image-size", "32", "--limit", "1"]
    assert evaluate.main([*args, "--out", str(tmp_path / "eval4")]) == 0
    spec = json.loads((tmp_path / "eval4" / "pred" / "dataset.json").read_text())
    assert spec["seed"] == 7 and spec["image_size"] == 32 and spec["length"] == 2
    conf4 = np.loadtxt(tmp_path / "eval4" / "confusion.csv", delimiter=",", skiprows=1, usecols=range(1, 22))
    assert conf4.sum() == 32 * 32


def test_zero_intervals_mean_only_at_the_end(tmp_path):
    train(_tiny(tmp_path, "z", checkpoint_every=0, log_every=0, panel_every=0, eval_at_end=False))
    log = (tmp_path / "z" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["4"]
    assert torch.load(tmp_path / "z" / "checkpoint.pt", weights_only=True)["iteration"] == 4


def test_resume_matches_uninterrupted_run(tmp_path):
    kw = dict(deterministic=True, eval_at_end=False, panel_every=0, dropout=0.5)  # dropout: RNG state matters
    try:
        train(_tiny(tmp_path, "full", **kw))
        train(_tiny(tmp_path, "split", stop_at=3, checkpoint_every=100, **kw))
        # tensors and Python values only: loads with weights_only=True (as resume and load_pretrained do)
        first = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
        assert first["iteration"] == 3 and not (tmp_path / "split" / "model_final.pt").exists()
        missing, unexpected = RRM("small", freeze_bn=False).load_pretrained(tmp_path / "split" / "checkpoint.pt")
        assert not missing and not unexpected
        # a checkpoint of the earlier format (numpy's RNG state as an array) still loads, still weights_only
        from rrm_cuda.rrm.model import load_state_file
        from rrm_cuda.rrm.train import _set_rng_state

        old = {**first, "rng": {**first["rng"], "numpy": np.random.get_state()}}
        torch.save(old, tmp_path / "old.pt")
        back = load_state_file(tmp_path / "old.pt")
        assert back["rng"]["numpy"][1].dtype == np.uint32
        _set_rng_state(back["rng"])
        assert np.array_equal(np.random.get_state()[1], old["rng"]["numpy"][1])
        train(_tiny(tmp_path, "split", resume="auto", **kw))
    finally:
        torch.use_deterministic_algorithms(False)
    a = torch.load(tmp_path / "full" / "model_final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "model_final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = RRM("small", freeze_bn=False).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())
    log = (tmp_path / "split" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4"]


def test_torchrun_two_processes_gloo(tmp_path):
    """torch.distributed: 2 CPU processes (gloo), DistributedSampler + DDP, pseudo labels per rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(root / "python" / "train_rrm.py"),
        "--train-length",
        "8",
        "--val-length",
        "1",
        "--image-size",
        "40",
        "--crop",
        "32",
        "--iterations",
        "3",
        "--warmup-cls-iterations",
        "1",
        "--cam-scales",
        "1",
        "0.5",
        "--crf-iterations",
        "2",
        "--threads",
        "1",
        "--log-every",
        "1",
        "--no-progress",
        "--out-dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "segmentation branch mIoU" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = (out / "log.csv").read_text().splitlines()
    # rank 0 logs; pseudo labels were made
    assert len(rows) == 4 and float(rows[-1].split(",")[8]) > 0, "\n".join(rows) + proc.stderr[-2000:]
    assert (out / "model_final.pt").is_file()
