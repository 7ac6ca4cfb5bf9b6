"""Anomaly map of Pyramid-Mamba (paper Sec. 3, "multi-scale averaging" as in RD4AD/MambaAD).

Per scale ``1 - cos(encoder, decoder)`` over channels, bilinearly up-sampled to the input size and
averaged over the scales. The Gaussian blur (sigma 4) is applied by the model afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AnomalyMapGenerator(nn.Module):
    """Mean over scales of the up-sampled cosine distance between encoder and decoder features.

    Args:
        input_size: ``(H, W)`` of the map to produce (the model's input size).
    """

    def __init__(self, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def forward(self, encoder_features: Sequence[Tensor], decoder_features: Sequence[Tensor]) -> Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map."""
        maps = []
        for enc, dec in zip(encoder_features, decoder_features, strict=True):
            distance = 1 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)
            maps.append(F.interpolate(distance, size=self.input_size, mode="bilinear", align_corners=True))
        return torch.stack(maps, dim=0).mean(dim=0)
