"""Training loss of Pyramid-Mamba (paper Sec. 4: "the sum of MSE at the multiple scales")."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

#: Weight of the summed MSE in the official code.
DEFAULT_LOSS_WEIGHT = 5.0


class PyramidMambaLoss(nn.Module):
    """``weight * sum_scales MSE(encoder, decoder)``.

    Args:
        weight: multiplier of the summed per-scale MSE (official code: 5.0).
    """

    def __init__(self, weight: float = DEFAULT_LOSS_WEIGHT) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, encoder_features: Sequence[Tensor], decoder_features: Sequence[Tensor]) -> Tensor:
        """Return the scalar loss; encoder features are targets (no gradient)."""
        losses = [
            F.mse_loss(dec, enc.detach()) for enc, dec in zip(encoder_features, decoder_features, strict=True)
        ]
        return self.weight * sum(losses)
