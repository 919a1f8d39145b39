"""The milpasses graph passes, registered with coremltools in the ``ane`` namespace on import."""

from milpasses.passes.attention import attention_to_einsum, key_padding_mask  # noqa: F401  (registration)
from milpasses.passes.layout import (  # noqa: F401  (registration)
    bc1s_layout,
    fold_unit_transposes,
    gather_from_transposed_table,
    gather_to_reshape,
    linear_to_conv,
    split_wide_outputs,
    unmerge_leading_axes,
)
from milpasses.passes.numerics import finite_masks, rms_norm_scale  # noqa: F401  (registration)
from milpasses.passes.report import PassReport, PassReports

__all__ = ["PassReport", "PassReports"]
