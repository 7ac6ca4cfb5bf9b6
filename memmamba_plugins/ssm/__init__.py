"""Framework-free selective-scan and SS2D core shared by both models (torch only)."""

from .selective_scan import (
    BACKEND_ENV,
    BACKENDS,
    ScanOrders,
    mamba_ssm_available,
    numba_available,
    resolve_backend,
    selective_scan,
    selective_scan_channel_last,
    selective_scan_orders,
    selective_scan_ref,
)
from .ss2d import (
    DIRECTIONS,
    LINEAR_INIT_STD,
    SS2D,
    check_region_size,
    cross_scan_orders,
    init_linear_and_norm,
    merge_regions,
    split_regions,
)

__all__ = [
    "DIRECTIONS",
    "LINEAR_INIT_STD",
    "init_linear_and_norm",
    "SS2D",
    "check_region_size",
    "cross_scan_orders",
    "merge_regions",
    "split_regions",
    "BACKENDS",
    "BACKEND_ENV",
    "ScanOrders",
    "mamba_ssm_available",
    "numba_available",
    "resolve_backend",
    "selective_scan",
    "selective_scan_channel_last",
    "selective_scan_orders",
    "selective_scan_ref",
]
