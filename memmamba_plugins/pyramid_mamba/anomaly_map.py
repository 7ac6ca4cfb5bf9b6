"""Anomaly map of Pyramid-Mamba (paper Sec. 3, "multi-scale averaging" as in RD4AD/MambaAD).

Per scale ``1 - cos(encoder, decoder)`` over channels, bilinearly up-sampled to the input size and
averaged over the scales. The Gaussian blur (sigma 4) is applied by the model afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib.models.components.filters import GaussianBlur2d
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


class SeparableGaussianBlur2d(GaussianBlur2d):
    """anomalib's :class:`GaussianBlur2d` (same kernel, padding and state dict), run as two 1-D passes.

    A Gaussian kernel is the outer product of two 1-D Gaussians, so a column pass followed by a row
    pass gives the same result with ``2k`` instead of ``k^2`` multiply-adds per pixel (k = 33 for
    sigma 4: the 2-D convolution alone took ~20 ms of a 256x256 CPU inference).
    """

    def __init__(self, sigma: float, channels: int = 1) -> None:
        super().__init__(sigma=sigma, channels=channels)
        kernel = self.kernel[:1, 0]  # (1, kh, kw), normalised to sum 1
        # row sums / column sums of a normalised outer product are its 1-D factors
        self.register_buffer(
            "kernel_y",
            kernel.sum(-1, keepdim=True).expand(channels, -1, -1).unsqueeze(1).clone(),
            persistent=False,
        )
        self.register_buffer(
            "kernel_x",
            kernel.sum(-2, keepdim=True).expand(channels, -1, -1).unsqueeze(1).clone(),
            persistent=False,
        )

    def forward(self, input_tensor: Tensor) -> Tensor:
        """Blur ``(B, C, H, W)`` with reflect padding; same shape out."""
        padded = F.pad(input_tensor, self.padding_shape, mode=self.border_type)
        columns = F.conv2d(padded, self.kernel_y, groups=self.channels)
        return F.conv2d(columns, self.kernel_x, groups=self.channels)
