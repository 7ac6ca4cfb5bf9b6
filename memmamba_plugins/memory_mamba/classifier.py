"""An ``ImageClassifier`` that routes MemoryMamba's memory states to the head during training.

mmpretrain's ``ImageClassifier.loss`` only passes the backbone's feature tuple to the head. The
memory losses (Sec. 4.3 of the MemoryMamba paper) also need each Mem-SSM block's query vectors
and (Z, fine read-out) pairs, so this subclass asks the backbone for them
(``return_memory=True``) and hands them to the head as ``memory=``. Prediction, feature
extraction and everything else are ``ImageClassifier``'s, unchanged.
"""

from __future__ import annotations

import inspect

from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor


@MODELS.register_module()
class MemoryMambaClassifier(ImageClassifier):
    """``ImageClassifier`` whose training loss includes the memory losses; same arguments."""

    def loss(self, inputs: Tensor, data_samples: list[DataSample]) -> dict[str, Tensor]:
        if "return_memory" not in inspect.signature(self.backbone.forward).parameters:
            return super().loss(inputs, data_samples)  # any other backbone: plain classification
        feats, memory = self.backbone(inputs, return_memory=True)
        if self.with_neck:
            feats = self.neck(feats)
        return self.head.loss(feats, data_samples, memory=memory)
