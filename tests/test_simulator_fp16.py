"""fp16 programs are simulated as the device stores them: rounded, overflowing, NaN-propagating."""

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import RangeObserver, simulate
from tests.helpers import mil_program


def _square_then_softmax(x):
    squared = mb.mul(x=x, y=x, name="square")
    return mb.softmax(x=squared, axis=-1, name="probabilities")


def test_each_fp16_result_is_rounded_to_fp16():
    x = np.array([1.0, 2048.0], np.float16)
    (out,) = simulate(mil_program(lambda x: mb.add(x=x, y=np.float16(1.0)), x=x), {"x": x}).values()
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, [2.0, 2048.0])  # 2049 is not an fp16 value: ties to even


def test_fp16_overflow_becomes_inf_and_softmax_of_inf_is_nan():
    x = np.array([[200.0, 300.0]], np.float16)  # 300**2 > 65504, the fp16 maximum
    observer = RangeObserver()
    (out,) = simulate(mil_program(_square_then_softmax, x=x), {"x": x}, observer=observer).values()
    assert np.isnan(out).all()
    assert observer.first_nonfinite["op"] == "square"
    assert observer.first_nonfinite["inf_count"] == 1
    square = next(r for r in observer.records if r["op"] == "square")
    assert square["max_abs"] == 40000.0 and square["dtype"] == "fp16"


def test_same_program_in_fp32_stays_finite():
    x = np.array([[200.0, 300.0]], np.float32)
    observer = RangeObserver()
    (out,) = simulate(mil_program(_square_then_softmax, x=x), {"x": x}, observer=observer).values()
    np.testing.assert_allclose(out, [[0.0, 1.0]])
    assert observer.first_nonfinite is None
    assert [r["op_type"] for r in observer.records] == ["mul", "softmax"]
