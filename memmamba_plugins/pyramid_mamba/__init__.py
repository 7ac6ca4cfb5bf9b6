"""Pyramid-Mamba for anomalib (Iqbal et al., "Pyramid-based Mamba Multi-class Unsupervised Anomaly
Detection", 2025).

* :class:`PyramidMamba` -- the anomalib/Lightning model (``anomalib train --model PyramidMamba``);
* :class:`PyramidMambaModel` -- the plain torch module;
* :class:`MVTec` -- multi-class MVTec AD datamodule (one model over all categories).
"""

from .data import MVTec
from .lightning_model import PyramidMamba
from .torch_model import PyramidMambaModel

__all__ = ["MVTec", "PyramidMamba", "PyramidMambaModel"]
