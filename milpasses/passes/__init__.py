"""The milpasses graph passes, registered with coremltools in the ``ane`` namespace on import."""

from milpasses.passes import (  # noqa: F401  (registration)
    attention_to_einsum,
    bc1s_layout,
    finite_masks,
    fold_unit_transposes,
    gather_from_transposed_table,
    gather_to_reshape,
    key_padding_mask,
    linear_to_conv,
    rms_norm_scale,
    unmerge_leading_axes,
)
from milpasses.passes.report import PassReport, PassReports

__all__ = ["PassReport", "PassReports"]
