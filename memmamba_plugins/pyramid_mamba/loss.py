"""Training loss of Pyramid-Mamba (paper Sec. 4: "the sum of MSE at the multiple scales").

``"mse"`` is the paper's loss. ``"cosine"`` sums ``1 - cos(encoder, decoder)`` over the scales instead:
the quantity the anomaly map measures. It matters for encoders whose features are large and not
post-ReLU (EfficientNet's linear bottlenecks, mean squares of 40-95 against ~1 for ResNet layers),
where the MSE is dominated by feature magnitudes that the cosine anomaly map ignores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

#: Weight of the summed per-scale loss in the official code.
DEFAULT_LOSS_WEIGHT = 5.0
LOSS_TYPES = ("mse", "cosine")
DEFAULT_LOSS_TYPE = "mse"


class PyramidMambaLoss(nn.Module):
    """``weight * sum_scales loss(encoder, decoder)``.

    Args:
        weight: multiplier of the summed per-scale loss (official code: 5.0).
        loss_type: ``"mse"`` (paper) or ``"cosine"`` (mean ``1 - cos`` over pixels, channels as vectors).
    """

    def __init__(self, weight: float = DEFAULT_LOSS_WEIGHT, loss_type: str = DEFAULT_LOSS_TYPE) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            msg = f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}."
            raise ValueError(msg)
        self.weight = weight
        self.loss_type = loss_type

    def forward(self, encoder_features: Sequence[Tensor], decoder_features: Sequence[Tensor]) -> Tensor:
        """Return the scalar loss; encoder features are targets (no gradient)."""
        if self.loss_type == "mse":
            losses = [F.mse_loss(dec, enc.detach()) for enc, dec in zip(encoder_features, decoder_features, strict=True)]
        else:
            losses = [
                (1 - F.cosine_similarity(dec, enc.detach(), dim=1)).mean()
                for enc, dec in zip(encoder_features, decoder_features, strict=True)
            ]
        return self.weight * sum(losses)
