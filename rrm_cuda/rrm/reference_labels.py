"""Pure numpy + pydensecrf reference of RRM's reliable pseudo labels, one image at a time.

A line-by-line transcription of the original ``compute_seg_label`` / ``_crf_with_alpha`` /
``crf_inference`` (RRM, AAAI 2020, on PSA's imutils), with the IndexError on a class without CAM
values > 0.1 handled as :func:`rrm_cuda.rrm.reliable_labels` does. Used by the tests only; needs
``pydensecrf`` (``pip install pydensecrf2``) unless a ``crf`` callable is given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CRF = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def crf_inference(img: np.ndarray, probs: np.ndarray, labels: int = 21, t: int = 10) -> np.ndarray:
    """PSA's ``imutils.crf_inference``: img (H, W, 3) uint8, probs (L, H, W) -> Q (L, H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    q = d.inference(t)
    return np.array(q).reshape((labels, h, w))


def _crf_with_alpha(ori_img: np.ndarray, cam_dict: dict[int, np.ndarray], alpha: float, crf: CRF) -> np.ndarray:
    v = np.array(list(cam_dict.values()))
    bg_score = np.power(1 - np.max(v, axis=0, keepdims=True), alpha)
    bgcam_score = np.concatenate((bg_score, v), axis=0)
    crf_score = crf(ori_img, bgcam_score, bgcam_score.shape[0])
    n_crf_al = np.zeros([21, bg_score.shape[1], bg_score.shape[2]])
    n_crf_al[0] = crf_score[0]
    for i, key in enumerate(cam_dict.keys()):
        n_crf_al[key + 1] = crf_score[i + 1]
    return n_crf_al


def compute_seg_label(
    ori_img: np.ndarray, cam_label: np.ndarray, norm_cam: np.ndarray, crf: CRF | None = None
) -> np.ndarray:
    """ori_img (H, W, 3) uint8, cam_label (20,), norm_cam (20, H, W) -> (H, W) labels {0..20, 255}."""
    crf = crf_inference if crf is None else crf
    cam_label = cam_label.astype(np.uint8)
    cam_dict = {}
    cam_np = np.zeros_like(norm_cam)
    for i in range(20):
        if cam_label[i] > 1e-5:
            cam_dict[i] = norm_cam[i]
            cam_np[i] = norm_cam[i]
    bg_score = np.power(1 - np.max(cam_np, 0), 32)[None]
    cam_all = np.concatenate((bg_score, cam_np))
    cam_img = np.argmax(cam_all, 0)
    if not cam_dict:  # no present class: everything is background (the original cannot run)
        return np.zeros(cam_img.shape, dtype=np.int64)

    crf_la = _crf_with_alpha(ori_img, cam_dict, 4, crf)
    crf_ha = _crf_with_alpha(ori_img, cam_dict, 32, crf)
    crf_la_label = np.argmax(crf_la, 0)
    crf_ha_label = np.argmax(crf_ha, 0)
    crf_label = crf_la_label.copy()
    crf_label[crf_la_label == 0] = 255

    cam_sure_region = np.zeros(cam_img.shape, dtype=bool)
    for class_i in np.unique(crf_la_label):
        cam_class = cam_all[class_i].copy()
        cam_class[cam_img != class_i] = 0
        if class_i != 0:
            order = np.sort(cam_class[cam_class > 0.1])
            if order.shape[0] == 0:
                continue
            confidence_value = order[int(order.shape[0] * 0.6)]
            cam_sure_region |= cam_class > confidence_value
        else:
            cam_sure_region |= cam_class > 0.8

    crf_label[crf_ha_label == 0] = 0
    crf_label_np = np.concatenate([crf_ha[:1], crf_la[1:]])
    not_sure = (np.max(crf_label_np, 0) < 0.8) | ~cam_sure_region
    crf_label[not_sure] = 255
    return crf_label.astype(np.int64)
