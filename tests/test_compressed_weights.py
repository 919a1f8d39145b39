"""passes/compressed.py: compressed weights reshaped, transposed and scaled without materialising."""

import numpy as np
import pytest
from coremltools.converters.mil.mil import types

from milpasses.passes.shared import compressed
from milpasses.passes.shared.compressed import Compressed
from milpasses.passes.shared.matching import NoMatch
from milpasses.simulator.ops import OP_IMPLEMENTATIONS

rng = np.random.default_rng(0)
GROUPED_LUT = Compressed("constexpr_lut_to_dense", {
    "indices": rng.integers(0, 16, (8, 6)).astype(types.np_uint4_dtype),
    "lut": rng.standard_normal((2, 1, 16, 1)).astype(np.float16)}, (8, 6))  # one table per 4 rows
CHANNEL_SCALED_LUT = Compressed("constexpr_lut_to_dense", {
    "indices": GROUPED_LUT.inputs["indices"],
    "lut": Compressed("constexpr_blockwise_shift_scale", {
        "data": rng.standard_normal((8, 1, 16, 1)).astype(np.float16),
        "scale": rng.uniform(0.5, 2, (8, 1, 1, 1)).astype(np.float16)}, (8, 1, 16, 1))}, (8, 6))
PACKED_LUT = Compressed("constexpr_lut_to_dense", {
    "lut": rng.standard_normal(4).astype(np.float16),
    "indices": rng.integers(0, 256, 12).astype(np.uint8), "shape": np.array([8, 6], np.uint32)}, (8, 6))
AFFINE = Compressed("constexpr_affine_dequantize", {
    "quantized_data": rng.integers(0, 256, (8, 6)).astype(np.uint8), "zero_point": np.uint8(128),
    "scale": rng.uniform(0.01, 0.02, 8).astype(np.float32), "axis": np.int32(0)}, (8, 6))
INT8 = Compressed("constexpr_blockwise_shift_scale", {
    "data": rng.integers(-127, 128, (8, 6)).astype(np.int8),
    "scale": rng.uniform(0.01, 0.02, (8, 1)).astype(np.float16)}, (8, 6))
PLANS = {"grouped lut": GROUPED_LUT, "lut scaled per channel": CHANNEL_SCALED_LUT, "packed lut": PACKED_LUT,
         "affine": AFFINE, "int8": INT8}


def dense(plan):
    """The weight a plan decompresses to, by the simulator's implementations (tested against coremltools')."""
    inputs = {k: dense(v) if isinstance(v, Compressed) else v for k, v in plan.inputs.items()}
    return np.asarray(OP_IMPLEMENTATIONS[plan.op_type](**inputs))


@pytest.mark.parametrize("name", list(PLANS))
def test_expanded_to_a_conv_weight_decompresses_to_the_reshaped_weight(name):
    plan = compressed.expanded(PLANS[name], 2, 2)
    assert plan.shape == (8, 6, 1, 1)
    np.testing.assert_array_equal(dense(plan), dense(PLANS[name]).reshape(8, 6, 1, 1))


@pytest.mark.parametrize("name", ["grouped lut", "lut scaled per channel", "affine", "int8"])
def test_transposed_decompresses_to_the_transposed_weight(name):
    plan = compressed.transposed(PLANS[name])
    assert plan.shape == (6, 8)
    np.testing.assert_array_equal(dense(plan), dense(PLANS[name]).T)


def test_packed_ios16_indices_are_not_transposed():
    assert isinstance(compressed.transposed(PACKED_LUT), NoMatch)


@pytest.mark.parametrize("name, lo, hi", [("grouped lut", 4, 8), ("lut scaled per channel", 2, 5),
                                          ("affine", 1, 3), ("int8", 0, 8), ("packed lut", 0, 8)])
def test_rows_scaled_scale_exactly_those_rows(name, lo, hi):
    expected = dense(PLANS[name]).astype(np.float32)
    expected[lo:hi] *= 0.125  # a power of two: the tables and scales take it exactly
    np.testing.assert_array_equal(dense(compressed.rows_scaled(PLANS[name], lo, hi, 0.125)), expected)


@pytest.mark.parametrize("name, lo, hi", [("grouped lut", 0, 2), ("packed lut", 0, 4)])
def test_rows_that_share_a_table_with_others_are_not_scaled(name, lo, hi):
    result = compressed.rows_scaled(PLANS[name], lo, hi, 0.5)
    assert isinstance(result, NoMatch) and "share" in result.reason
