"""An ``ImageClassifier`` that routes MemoryMamba's memory states to the head during training.

mmpretrain's ``ImageClassifier.loss`` only passes the backbone's feature tuple to the head. The
memory losses (Sec. 4.3 of the MemoryMamba paper) also need each Mem-SSM block's query vectors
and (Z, fine read-out) pairs, so this subclass asks the backbone for them
(``return_memory=True``) and hands them to the head as ``memory=``. Prediction, feature
extraction and everything else are ``ImageClassifier``'s, unchanged.
"""

from __future__ import annotations

import copy
import inspect

from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor

from .backbone import MemoryMamba


def _fill_head_width(backbone: dict, head: dict | None) -> dict | None:
    """``head.in_channels=None`` becomes the width of the MemoryMamba backbone's last output stage."""
    if not isinstance(head, dict) or head.get("in_channels", 0) is not None:
        return head
    if not isinstance(backbone, dict) or backbone.get("type") not in ("MemoryMamba", MemoryMamba):
        raise ValueError(
            "head.in_channels=None follows a MemoryMamba backbone's arch; set it for other backbones."
        )
    head = copy.deepcopy(head)
    head["in_channels"] = MemoryMamba.output_channels(
        backbone.get("arch", "tiny"), backbone.get("out_indices", (-1,))
    )[-1]
    return head


@MODELS.register_module()
class MemoryMambaClassifier(ImageClassifier):
    """``ImageClassifier`` whose training loss includes the memory losses; same arguments.

    ``head.in_channels=None`` takes the width of the backbone's last output (768 for ``tiny`` and
    ``small``, 1024 for ``base``); an explicit width that does not match a MemoryMamba backbone is
    one clear error at construction instead of a shape error in the first step.
    """

    def __init__(self, backbone: dict, neck: dict | None = None, head: dict | None = None, **kwargs) -> None:
        super().__init__(backbone=backbone, neck=neck, head=_fill_head_width(backbone, head), **kwargs)
        width = getattr(self.head, "in_channels", None) if self.with_head else None
        if isinstance(self.backbone, MemoryMamba) and isinstance(width, int):
            expected = self.backbone.dims[self.backbone.out_indices[-1]]
            if width != expected:
                raise ValueError(
                    f"head.in_channels={width} does not match the MemoryMamba backbone's last output width "
                    f"{expected}; set head.in_channels={expected} or None (follows the arch)."
                )

    def loss(self, inputs: Tensor, data_samples: list[DataSample]) -> dict[str, Tensor]:
        if "return_memory" not in inspect.signature(self.backbone.forward).parameters:
            return super().loss(inputs, data_samples)  # any other backbone: plain classification
        feats, memory = self.backbone(inputs, return_memory=True)
        if self.with_neck:
            feats = self.neck(feats)
        return self.head.loss(feats, data_samples, memory=memory)
