"""numerics="device": fp16 at every step inside an op, against a float64 numpy emulation of those
steps written here (not the simulator's kernels), and the overflows only device numerics see."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses.simulator.fp16_check import check_fp16
from milpasses.simulator import DeviceNumerics, Simulator, psnr, simulate
from tests.helpers import mil_program

rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float16)


def f16(value):
    """float64 rounded to fp16, subnormals flushed: the device's storage of one step."""
    rounded = np.asarray(value, np.float64).astype(np.float16).astype(np.float64)
    return np.where(np.abs(rounded) < 2.0 ** -14, 0.0, rounded)


def saturated(value):
    """A matmul-class output: rounded, inf past 32752 (ANEForge issue #115)."""
    rounded = f16(value)
    return np.where(np.abs(rounded) > 32752, np.sign(rounded) * np.inf, rounded)


def dot(a, b):
    """a @ b with each product rounded to fp16 and the products added wide."""
    return f16(a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def running_sum(x, axis):
    """An fp16 running sum along ``axis``, in index order."""
    x = np.moveaxis(x, axis, 0)
    total = x[0]
    for row in x[1:]:
        total = f16(total + row)
    return np.expand_dims(total, axis)


def one_op(build, numerics, **inputs):
    (out,) = simulate(mil_program(build, **inputs), inputs, numerics=numerics).values()
    return out.astype(np.float64)


def assert_matches_reference(build, reference, **inputs):
    """Device numerics equal the emulation (to one fp16 step where an fp32 and a float64
    accumulator round apart); storage numerics do not, so the device form really ran."""
    expected = reference(**{k: v.astype(np.float64) for k, v in inputs.items()})
    device, storage = one_op(build, "device", **inputs), one_op(build, "storage", **inputs)
    ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(device - expected) <= ulp)
    assert np.mean(device != expected) < 0.01
    assert np.any(storage != expected)


W_LINEAR, B_LINEAR = randn(24, 64), randn(24)


def test_linear_rounds_each_product_and_adds_them_wide():
    assert_matches_reference(lambda x: mb.linear(x=x, weight=W_LINEAR, bias=B_LINEAR),
                             lambda x: saturated(dot(x, W_LINEAR.T.astype(np.float64)) + B_LINEAR),
                             x=randn(3, 16, 64))


def test_matmul_with_transposed_operand():
    assert_matches_reference(lambda a, b: mb.matmul(x=a, y=b, transpose_y=True),
                             lambda a, b: saturated(dot(a, np.swapaxes(b, -1, -2))),
                             a=randn(2, 8, 48), b=randn(2, 10, 48))


def test_einsum_of_the_bc1s_attention_layout():
    def reference(a, b):  # nchw,nwhu->nchu: contract w
        return saturated(f16(a[..., :, None] * np.transpose(b, (0, 2, 1, 3))[:, None]).sum(-2))

    assert_matches_reference(lambda a, b: mb.einsum(values=(a, b), equation="nchw,nwhu->nchu"), reference,
                             a=randn(2, 6, 1, 40), b=randn(2, 40, 1, 7))


W_CONV, B_CONV = randn(8, 4, 3, 3), randn(8)


def test_conv_with_groups_stride_and_padding_adds_every_tap_in_one_accumulator():
    def reference(x):
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((1, 8, 5, 5))
        for o in range(8):
            group = x[0, 4 * (o // 4): 4 * (o // 4) + 4]
            for i in range(5):
                for j in range(5):
                    out[0, o, i, j] = f16(group[:, 2 * i: 2 * i + 3, 2 * j: 2 * j + 3] * W_CONV[o]).sum()
        return saturated(out + B_CONV[None, :, None, None])

    assert_matches_reference(lambda x: mb.conv(x=x, weight=W_CONV, bias=B_CONV, strides=[2, 2], groups=2,
                                                pad_type="custom", pad=[1, 1, 1, 1]),
                             reference, x=randn(1, 8, 9, 9))


def test_softmax_rounds_max_subtraction_exp_running_sum_and_division():
    def reference(x):
        exponent = f16(np.exp(f16(x - x.max(-1, keepdims=True))))
        return f16(exponent / running_sum(exponent, -1))

    assert_matches_reference(lambda x: mb.softmax(x=x, axis=-1), reference, x=randn(4, 6, 96, scale=3.0))


G_NORM, B_NORM = randn(128), randn(128)


def test_layer_norm_rounds_mean_variance_and_rsqrt():
    def reference(x):
        mean = f16(running_sum(x, -1) / 128)
        centred = f16(x - mean)
        variance = f16(running_sum(f16(centred * centred), -1) / 128)
        normalised = f16(centred * f16(1 / np.sqrt(f16(variance + f16(1e-3)))))
        return f16(f16(normalised * G_NORM) + B_NORM)

    assert_matches_reference(
        lambda x: mb.layer_norm(x=x, axes=[-1], gamma=G_NORM, beta=B_NORM, epsilon=np.float16(1e-3)),
        reference, x=randn(3, 5, 128, scale=4.0))


def test_reduce_mean_and_l2_norm_sum_in_fp16():
    assert_matches_reference(lambda x: mb.reduce_mean(x=x, axes=[1], keep_dims=True),
                             lambda x: f16(running_sum(x, 1) / 300), x=randn(4, 300, 3, scale=8.0))
    assert_matches_reference(lambda x: mb.reduce_l2_norm(x=x, axes=[-1], keep_dims=True),
                             lambda x: f16(np.sqrt(running_sum(f16(x * x), -1))), x=randn(6, 500, scale=4.0))


def test_matmul_adds_wide_where_reduce_sum_stalls_at_2048():
    """ANEForge's finding: matmul accumulates wide, reduce_sum in fp16 (2048 + 1 rounds to 2048)."""
    ones = np.ones((1, 4096), np.float16)
    reduce_sum = lambda x: mb.reduce_sum(x=x, axes=[-1])  # noqa: E731
    assert one_op(reduce_sum, "storage", x=ones) == 4096
    assert one_op(reduce_sum, "device", x=ones) == 2048
    assert one_op(reduce_sum, DeviceNumerics(reduction_accumulator="fp32"), x=ones) == 4096
    column = np.ones((4096, 1), np.float16)
    assert one_op(lambda x: mb.matmul(x=x, y=column), "device", x=ones) == 4096
    assert one_op(lambda x: mb.matmul(x=x, y=column), DeviceNumerics(matmul_accumulator="fp16"), x=ones) == 2048


@pytest.mark.parametrize("k, device", [(32, 32000.0), (33, np.inf)])
def test_matmul_output_past_32752_is_inf_on_the_device(k, device):
    """ANEForge issue #115: 1000s times ones, K=32 exact, K=33 inf."""
    x = np.full((1, k), 1000.0, np.float16)
    ones = np.ones((k, 1), np.float16)
    assert one_op(lambda x: mb.matmul(x=x, y=ones), "storage", x=x) == np.float16(1000.0 * k)
    assert one_op(lambda x: mb.matmul(x=x, y=ones), "device", x=x) == device


def test_reduce_l2_norm_overflowing_inside_is_found_only_in_device_numerics():
    x = np.full((1, 8), np.sqrt(200000 / 8), np.float16)  # squares sum to 200000 > 65504
    program = mil_program(lambda x: mb.reduce_l2_norm(x=x, axes=[-1], name="norm"), x=x)
    assert one_op(lambda x: mb.reduce_l2_norm(x=x, axes=[-1]), "storage", x=x) == pytest.approx(447.2, abs=0.5)
    simulator = Simulator(program, numerics="device")
    assert np.isinf(simulator.run({"x": x})["norm"]).all()
    assert [(o.op, o.step) for o in simulator.overflows] == [("norm", "sum of squares")]
    assert check_fp16(program, {"x": x}) == []
    (finding,) = check_fp16(program, {"x": x}, numerics="device")
    assert (finding.op, finding.kind) == ("norm", "overflow") and "sum of squares" in finding.detail


def test_fused_layer_norm_on_large_values_overflows_at_its_squares():
    x = np.clip(randn(2, 4, 64, scale=300.0), -300, 300)
    layer_norm = lambda x: mb.layer_norm(x=x, axes=[-1], epsilon=np.float16(1e-3), name="norm")  # noqa: E731
    centred = x.astype(np.float64) - x.mean(-1, keepdims=True)
    expected = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-3)
    assert psnr(expected, one_op(layer_norm, "storage", x=x)) > 70
    assert psnr(expected, one_op(layer_norm, "device", x=x)) < 20
    (finding,) = check_fp16(mil_program(layer_norm, x=x), {"x": x}, numerics="device")
    assert (finding.op, finding.op_type, finding.kind) == ("norm", "layer_norm", "overflow")
    assert "squares" in finding.detail


def test_fp32_ops_stay_fp32_in_device_numerics():
    x = rng.standard_normal((3, 40)).astype(np.float32)
    build = lambda x: mb.softmax(x=mb.linear(x=x, weight=W_LINEAR[:, :40].astype(np.float32)), axis=-1)  # noqa: E731
    np.testing.assert_array_equal(one_op(build, "device", x=x), one_op(build, "storage", x=x))


def test_unknown_numerics_is_refused():
    with pytest.raises(ValueError, match="numerics"):
        simulate(mil_program(lambda x: mb.relu(x=x), x=randn(2)), {"x": randn(2)}, numerics="fp16")
