"""Low-level operators: the selective scan and the scan orders."""
from .scan_orders import (
    SCAN_ORDERS,
    ch_scan_order,
    direction_permutations,
    hilbert_scan_order,
    inverse_permutation,
    raster_scan_order,
    scan_order,
)
from .selective_scan import linear_recurrence, mamba_ssm_available, selective_scan, selective_scan_reference

__all__ = [
    "SCAN_ORDERS",
    "ch_scan_order",
    "direction_permutations",
    "hilbert_scan_order",
    "inverse_permutation",
    "linear_recurrence",
    "mamba_ssm_available",
    "raster_scan_order",
    "scan_order",
    "selective_scan",
    "selective_scan_reference",
]
