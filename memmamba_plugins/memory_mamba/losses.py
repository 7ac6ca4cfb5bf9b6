"""The memory losses of MemoryMamba (Sec. 4.3), registered in mmpretrain's ``MODELS``.

Both take the per-block :class:`~.memory.MemoryState` list the backbone returns with
``return_memory=True`` and average over the blocks that carry the memory in question.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmpretrain.registry import MODELS
from torch import Tensor, nn

from .memory import MemoryState

#: Default margin ``delta``: classes' mean coarse queries must be at least this cosine distance apart.
DEFAULT_MARGIN = 0.5
#: InfoNCE temperature of the official code.
DEFAULT_TEMPERATURE = 0.5


def class_means(queries: Tensor, labels: Tensor) -> Tensor:
    """Mean query vector of every class present in the batch: ``(B, c), (B,) -> (K', c)``."""
    classes = labels.unique()
    return torch.stack([queries[labels == k].mean(0) for k in classes])


def margin_contrastive(class_queries: Tensor, margin: float) -> Tensor:
    """Hinge on the cosine *distance* between different classes' query vectors (Eq. 23, as intended).

    The paper's text asks that ``delta`` be "the minimum acceptable distance between classes", so
    a pair is penalised when ``1 - cos(h_k, h_j) < delta``: ``max(0, delta - (1 - cos))``. The
    printed ``max(0, delta - cos)`` would instead penalise dissimilar classes, pulling them
    together (see docs/memory_mamba.md). Averaged over the ordered pairs ``j != k``.

    Args:
        class_queries: ``(K, c)`` one query vector per class.
        margin: ``delta``.

    Returns:
        Scalar loss; ``0`` (still differentiable) for fewer than two classes.
    """
    k = class_queries.shape[0]
    if k < 2:
        return class_queries.sum() * 0.0
    normed = F.normalize(class_queries, dim=-1)
    cos = normed @ normed.t()
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=cos.device)
    return F.relu(margin - (1.0 - cos[off_diagonal])).mean()


def info_nce(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """InfoNCE (Eq. 24) with in-batch negatives: row ``i`` of ``positives`` is the positive of ``anchors[i]``.

    The similarity is the cosine scaled by ``1 / temperature`` (the official code's choice).
    """
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).t() / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


@MODELS.register_module()
class MemoryContrastiveLoss(nn.Module):
    """Coarse-memory contrastive margin loss ``L_contrastive`` (Sec. 4.3.1), times ``loss_weight`` (``lambda_c``).

    Args:
        margin: ``delta``, the minimum cosine distance between class query vectors.
        loss_weight: ``lambda_c``.
    """

    def __init__(self, margin: float = DEFAULT_MARGIN, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.margin = margin
        self.loss_weight = loss_weight

    def forward(self, states: Sequence[MemoryState], labels: Tensor) -> Tensor | None:
        terms = [
            margin_contrastive(class_means(s.coarse_query, labels), self.margin)
            for s in states
            if s.coarse_query is not None
        ]
        if not terms:
            return None
        return self.loss_weight * torch.stack(terms).mean()


@MODELS.register_module()
class MemoryInfoNCELoss(nn.Module):
    """Fine-memory InfoNCE ``L_NCE`` (Sec. 4.3.2) between ``Z`` and its fine read-out, times ``lambda_f``.

    Args:
        temperature: softmax temperature.
        loss_weight: ``lambda_f``.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, loss_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = temperature
        self.loss_weight = loss_weight

    def forward(self, states: Sequence[MemoryState], labels: Tensor | None = None) -> Tensor | None:
        terms = [
            info_nce(s.fine_z, s.fine_readout, self.temperature)
            for s in states
            if s.fine_z is not None and s.fine_readout is not None
        ]
        if not terms:
            return None
        return self.loss_weight * torch.stack(terms).mean()
