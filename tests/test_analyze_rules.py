"""Each placement rule fires on a tiny program that breaks its constraint, and only then."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types

from milpasses.analyze import rules as R
from tests.helpers import mil_program

IOS16 = R.Context()


def only_op(program, op_type):
    (op,) = program.functions["main"].find_ops(op_type=op_type)
    return op


def relu_op(shape, dtype=np.float16, opset=ct.target.iOS16):
    return only_op(mil_program(lambda x: mb.relu(x=x), opset=opset, x=np.zeros(shape, dtype)), "relu")


def check_prediction(prediction, rule, device):
    assert prediction is not None, f"{rule.__name__} did not fire"
    assert prediction.device == device and prediction.rule == rule.__name__
    assert prediction.confidence in (R.DOCUMENTED, R.REVERSE_ENGINEERED, R.COMMUNITY)
    assert prediction.reason and prediction.source and prediction.scope


def test_fp32_compute():
    check_prediction(R.fp32_compute(relu_op((2, 8), np.float32), IOS16), R.fp32_compute, R.GPU)
    assert R.fp32_compute(relu_op((2, 8)), IOS16) is None


def test_int32_arithmetic_and_casts():
    ints = np.zeros((2, 8), np.int32)
    add = only_op(mil_program(lambda x: mb.add(x=x, y=np.int32(1)), x=ints), "add")
    cast = only_op(mil_program(lambda x: mb.cast(x=x, dtype="fp16"), x=ints), "cast")
    check_prediction(R.int32_tensors(add, IOS16), R.int32_tensors, R.CPU)
    check_prediction(R.int32_tensors(cast, IOS16), R.int32_tensors, R.CPU)
    # integer constants (axes, shapes) are not int32 tensors the ANE computes on
    reshape = only_op(mil_program(lambda x: mb.reshape(x=x, shape=[16]), x=np.zeros((2, 8), np.float16)), "reshape")
    assert R.int32_tensors(reshape, IOS16) is None


def test_rank_above_five():
    check_prediction(R.rank_above_five(relu_op((1, 1, 2, 2, 2, 2)), IOS16), R.rank_above_five, R.CPU)
    assert R.rank_above_five(relu_op((1, 2, 2, 2, 2)), IOS16) is None


def test_dimension_above_16384():
    check_prediction(R.dimension_above_limit(relu_op((1, 16385)), IOS16), R.dimension_above_limit, R.GPU)
    assert R.dimension_above_limit(relu_op((1, 16384)), IOS16) is None


def test_gather_and_scatter():
    table = np.zeros((10, 4), np.float16)
    ids = np.zeros((1, 3), np.int32)
    gather = only_op(mil_program(lambda ids: mb.gather(x=table, indices=ids, axis=0), ids=ids), "gather")
    check_prediction(R.gather_scatter(gather, IOS16), R.gather_scatter, R.CPU)
    assert R.predict(gather, IOS16)[0].rule == "gather_scatter"  # deciding over the int32 indices
    assert R.gather_scatter(relu_op((2, 8)), IOS16) is None


def test_runtime_offset_slice():
    x = np.zeros((4, 8), np.float16)
    dynamic = only_op(mil_program(lambda x, begin: mb.slice_by_index(x=x, begin=begin, end=[4, 8]),
                                  x=x, begin=np.zeros(2, np.int32)), "slice_by_index")
    static = only_op(mil_program(lambda x: mb.slice_by_index(x=x, begin=[0, 2], end=[4, 8]), x=x),
                     "slice_by_index")
    check_prediction(R.runtime_offset_slice(dynamic, IOS16), R.runtime_offset_slice, R.CPU)
    assert R.runtime_offset_slice(static, IOS16) is None


def test_control_flow():
    def branch(x):
        positive = mb.greater(x=mb.reduce_sum(x=x), y=np.float16(0))
        return mb.cond(pred=positive, _true_fn=lambda: mb.relu(x=x), _false_fn=lambda: mb.sigmoid(x=x))

    program = mil_program(branch, x=np.zeros((2,), np.float16))
    check_prediction(R.control_flow(only_op(program, "cond"), IOS16), R.control_flow, R.CPU)
    assert R.control_flow(relu_op((2, 8)), IOS16) is None


def test_rangedim_flexible_input():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, get_new_symbol()), dtype=types.fp16)],
                opset_version=ct.target.iOS16)
    def flexible(x):
        return mb.relu(x=x)

    op = only_op(flexible, "relu")
    check_prediction(R.flexible_shape(op, IOS16), R.flexible_shape, R.GPU)
    assert R.flexible_shape(op, R.Context(enumerated_inputs=frozenset({"x"}))) is None
    assert R.flexible_shape(relu_op((1, 8)), IOS16) is None


@pytest.mark.parametrize("opset, fires", [(ct.target.iOS15, True), (ct.target.iOS16, False)])
def test_matmul_of_two_activations_before_ios16(opset, fires):
    x = np.zeros((2, 4), np.float16)
    program = mil_program(lambda x, y: mb.matmul(x=x, y=y), opset=opset, x=x, y=x.T.copy())
    prediction = R.activation_matmul_before_ios16(only_op(program, "matmul"), R.Context(opset=opset))
    if fires:
        check_prediction(prediction, R.activation_matmul_before_ios16, R.GPU)
    else:
        assert prediction is None


def test_matmul_by_a_constant_is_fine_before_ios16():
    weight = np.zeros((4, 3), np.float16)
    program = mil_program(lambda x: mb.matmul(x=x, y=weight), opset=ct.target.iOS15, x=np.zeros((2, 4), np.float16))
    assert R.activation_matmul_before_ios16(only_op(program, "matmul"), R.Context(opset=ct.target.iOS15)) is None


def test_weights_over_1_gb_on_iphone_and_2_gib_on_mac():
    weight = np.zeros((3, 4), np.float16)
    linear = only_op(mil_program(lambda x: mb.linear(x=x, weight=weight), x=np.zeros((2, 4), np.float16)), "linear")
    check_prediction(R.weights_too_large(linear, R.Context(weight_bytes=1.5e9)), R.weights_too_large, R.GPU)
    macos27 = R.weights_too_large(linear, R.Context(weight_bytes=1.5e9, is_mac=True))
    check_prediction(macos27, R.weights_too_large, R.CPU)
    assert "macOS 27" in macos27.scope and "--compress" in macos27.reason
    assert R.weights_too_large(linear, R.Context(weight_bytes=0.9 * 2**30, is_mac=True)) is None
    check_prediction(R.weights_too_large(linear, R.Context(weight_bytes=3 * 2**30, is_mac=True)),
                     R.weights_too_large, R.GPU)
    assert R.weights_too_large(linear, R.Context(weight_bytes=10**8)) is None
    assert R.weights_too_large(relu_op((2, 8)), R.Context(weight_bytes=1.5e9)) is None  # reads no weights


def test_an_op_reading_a_compressed_weight_reads_weights():
    def compressed_linear(x):
        weight = mb.constexpr_blockwise_shift_scale(data=np.ones((3, 4), np.int8), scale=np.ones((3, 1), np.float16))
        return mb.linear(x=x, weight=weight)

    linear = only_op(mil_program(compressed_linear, opset=ct.target.iOS18, x=np.zeros((2, 4), np.float16)), "linear")
    prediction = R.weights_too_large(linear, R.Context(weight_bytes=3 * 2**30, is_mac=True))
    check_prediction(prediction, R.weights_too_large, R.GPU)
    assert "split the model" in prediction.reason


def test_an_fp16_op_with_no_constraint_is_predicted_on_the_ane_as_a_heuristic():
    (prediction,) = R.predict(relu_op((1, 64, 1, 128)), IOS16)
    assert (prediction.device, prediction.rule, prediction.confidence) == (R.ANE, "default", R.COMMUNITY)
