"""memmamba-plugins: Mamba vision models for anomalib and mmpretrain.

Importing this package is cheap: it pulls in neither torch nor the frameworks. The
framework glue lives in submodules that are imported on demand:

* :mod:`memmamba_plugins.ssm` -- framework-free selective scan and SS2D core (torch only).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
