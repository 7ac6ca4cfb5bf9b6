"""MemoryMamba classification head (Sec. 4.1, Eqs. 5-7, and the total loss of Eq. 25).

Reference: MemoryMamba: Memory-Augmented State Space Model for Defect Recognition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmpretrain.models.heads import ClsHead
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample
from torch import Tensor, nn

from .memory import MemoryState


@MODELS.register_module()
class MemoryMambaClsHead(ClsHead):
    """MLP classifier + cross-entropy, plus the coarse/fine memory losses.

    ``L = L_cls + lambda_c * L_contrastive + lambda_f * L_NCE`` (Eq. 25); the weights live in the
    loss configs' ``loss_weight``. The three terms are logged as ``loss_cls``,
    ``loss_contrastive`` and ``loss_nce`` (mmengine sums every ``loss*`` key). The memory terms
    need the backbone's :class:`~.memory.MemoryState` list, which
    :class:`~.classifier.MemoryMambaClassifier` passes as ``memory``; without it (e.g. under a
    plain ``ImageClassifier``) only ``loss_cls`` is computed.

    Args:
        num_classes: number of classes ``K``.
        in_channels: width of the pooled backbone feature (``None`` only under
            :class:`~.classifier.MemoryMambaClassifier`, which fills it in from the arch).
        hidden_channels: hidden width of the MLP of Eq. 5 (Linear-GELU-Dropout-Linear); ``None``
            for a single linear layer, as the official VMamba-based code.
        dropout: dropout before the last layer.
        loss: classification loss config.
        coarse_loss: config of :class:`~.losses.MemoryContrastiveLoss` or ``None`` to disable.
        fine_loss: config of :class:`~.losses.MemoryInfoNCELoss` or ``None`` to disable.
        **kwargs: forwarded to :class:`ClsHead` (``topk``, ``cal_acc``, ``init_cfg``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int | None,
        hidden_channels: int | None = None,
        dropout: float = 0.0,
        loss: dict | None = None,
        coarse_loss: dict | None = None,
        fine_loss: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(loss=loss or {"type": "CrossEntropyLoss", "loss_weight": 1.0}, **kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        if in_channels is None:
            raise ValueError(
                "in_channels=None is filled in from the backbone's arch by MemoryMambaClassifier; "
                "under another classifier set head.in_channels to the backbone's output width."
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        if hidden_channels:
            self.mlp = nn.Sequential(
                nn.Linear(in_channels, hidden_channels),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_channels, num_classes),
            )
        else:
            self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, num_classes))
        self.coarse_loss = MODELS.build(coarse_loss) if coarse_loss else None
        self.fine_loss = MODELS.build(fine_loss) if fine_loss else None

    def pre_logits(self, feats: tuple[Tensor, ...]) -> Tensor:
        """Last stage feature, globally average-pooled when the neck has not done so."""
        feat = feats[-1]
        return feat.mean(dim=(2, 3)) if feat.dim() == 4 else feat

    def forward(self, feats: tuple[Tensor, ...]) -> Tensor:
        return self.mlp(self.pre_logits(feats))

    def loss(
        self,
        feats: tuple[Tensor, ...],
        data_samples: list[DataSample],
        memory: Sequence[MemoryState] | None = None,
        **kwargs,
    ) -> dict[str, Tensor]:
        """``loss_cls`` plus, given the backbone's memory states, ``loss_contrastive`` and ``loss_nce``."""
        cls_score = self(feats)
        losses = {
            f"{key}_cls" if key == "loss" else key: value
            for key, value in self._get_loss(cls_score, data_samples, **kwargs).items()
        }
        if memory:
            labels = torch.cat([sample.gt_label for sample in data_samples]).to(cls_score.device)
            for key, module in (("loss_contrastive", self.coarse_loss), ("loss_nce", self.fine_loss)):
                if module is None:
                    continue
                value = module(memory, labels)
                if value is not None:
                    losses[key] = value
        return losses
