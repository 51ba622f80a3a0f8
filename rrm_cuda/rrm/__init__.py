"""RRM (Zhang et al., AAAI 2020 / Pattern Recognition 2022): one-step weakly supervised semantic
segmentation with reliable region mining, built on rrm_cuda's dense CRF and losses.

Modules: ``model`` (ResNet-38 + CAM + segmentation branch), ``pseudo_labels`` (multi-scale CAM,
reliable labels), ``losses``, ``data`` (VOC / SBD and an embedded synthetic dataset), ``metrics``,
``train``, ``infer``, ``evaluate``.
"""

from .metrics import confusion_matrix, iou_from_confusion, mean_iou
from .model import RRM, ResNet38, convert_mxnet_resnet38
from .pseudo_labels import multiscale_cam, reliable_label_parts, reliable_labels

__all__ = [
    "RRM",
    "ResNet38",
    "confusion_matrix",
    "convert_mxnet_resnet38",
    "iou_from_confusion",
    "mean_iou",
    "multiscale_cam",
    "reliable_label_parts",
    "reliable_labels",
]
