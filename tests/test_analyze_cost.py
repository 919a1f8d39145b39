"""The cost model against hand-counted FLOPs and bytes, and DistilBERT-base against Apple's anchors."""

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from fixtures import families as F
from fixtures.distilbert_2022 import DistilBert2022, convert_2022
from milpasses.analyze import analyze
from milpasses.analyze import cost as C
from milpasses.analyze.render import compare_lines
from milpasses.analyze.rules import ANE, CPU
from tests.helpers import mil_program

FP16 = 2  # bytes


def only_op(program, op_type):
    (op,) = program.functions["main"].find_ops(op_type=op_type)
    return op


def test_linear_flops_and_bytes():
    x = np.zeros((2, 16, 32), np.float16)
    weight, bias = np.ones((24, 32), np.float16), np.ones(24, np.float16)
    op = only_op(mil_program(lambda x: mb.linear(x=x, weight=weight, bias=bias), x=x), "linear")
    assert C.flops(op) == 2 * (2 * 16 * 24) * 32 + 2 * 16 * 24
    on_cpu = C.op_cost(op, CPU)
    assert on_cpu.weight_bytes == (24 * 32 + 24) * FP16
    assert on_cpu.activation_bytes == (2 * 16 * 32 + 2 * 16 * 24) * FP16
    assert on_cpu.relayout_bytes == 0
    on_ane = C.op_cost(op, ANE)
    padded_out = 2 * 16 * 64  # a 24-wide fp16 row is 48 bytes, padded to 64
    assert on_ane.activation_bytes == 2 * 16 * 32 * FP16 + padded_out
    assert on_ane.relayout_bytes == 2 * (2 * 16 * 32 * FP16 + padded_out)  # reduces the last (width) axis


def test_matmul_and_einsum_flops():
    x, y = np.zeros((1, 4, 8, 16), np.float16), np.zeros((1, 4, 16, 8), np.float16)
    matmul = only_op(mil_program(lambda x, y: mb.matmul(x=x, y=y), x=x, y=y), "matmul")
    assert C.flops(matmul) == 2 * (4 * 8 * 8) * 16
    q, k = np.zeros((1, 64, 1, 32), np.float16), np.zeros((1, 32, 1, 64), np.float16)
    einsum = only_op(mil_program(lambda q, k: mb.einsum(values=(q, k), equation="nchw,nwhu->nchu"), q=q, k=k),
                     "einsum")
    assert C.flops(einsum) == 2 * 1 * 64 * 1 * 32 * 64


def test_conv_flops_and_weight_bytes():
    x = np.zeros((1, 8, 10, 10), np.float16)
    weight, bias = np.ones((16, 2, 3, 3), np.float16), np.ones(16, np.float16)
    op = only_op(mil_program(lambda x: mb.conv(x=x, weight=weight, bias=bias, groups=4), x=x), "conv")
    outputs = 16 * 8 * 8
    assert C.flops(op) == 2 * outputs * (2 * 3 * 3) + outputs
    assert C.op_cost(op, ANE).weight_bytes == (16 * 2 * 3 * 3 + 16) * FP16
    assert C.op_cost(op, ANE).relayout_bytes == 0  # conv reduces over channels


def test_small_last_axis_is_padded_to_64_bytes_on_the_ane_only():
    def bsc(x):
        return mb.relu(x=x)

    narrow_last = only_op(mil_program(bsc, x=np.zeros((1, 128, 7), np.float16)), "relu")
    wide_last = only_op(mil_program(bsc, x=np.zeros((1, 7, 128), np.float16)), "relu")
    assert C.op_cost(narrow_last, ANE).activation_bytes == 2 * 128 * 64
    assert C.op_cost(narrow_last, CPU).activation_bytes == 2 * 128 * 7 * FP16
    assert C.op_cost(wide_last, ANE).activation_bytes == 2 * 7 * 128 * FP16
    assert C.padded_bytes(narrow_last.outputs[0]) / C.dense_bytes(narrow_last.outputs[0]) == pytest.approx(64 / 14)


def test_views_are_free_and_transposes_copy():
    x = np.zeros((1, 128, 768), np.float16)
    split_heads = only_op(mil_program(lambda x: mb.reshape(x=x, shape=[1, 128, 12, 64]), x=x), "reshape")
    to_bc1s = only_op(mil_program(lambda x: mb.transpose(x=x, perm=[0, 2, 1]), x=x), "transpose")
    moves_ones = only_op(mil_program(lambda x: mb.transpose(x=x, perm=[1, 0, 2]), x=x), "transpose")
    assert C.op_cost(split_heads, ANE).bytes == 0  # 64 fp16 = 128 bytes: padding changes nothing
    assert C.op_cost(to_bc1s, ANE).bytes == 2 * 128 * 768 * FP16
    assert C.op_cost(moves_ones, ANE).bytes == 0
    narrow = np.zeros((1, 128, 12), np.float16)
    regroup = only_op(mil_program(lambda x: mb.reshape(x=x, shape=[1, 128, 3, 4]), x=narrow), "reshape")
    assert C.op_cost(regroup, ANE).bytes == 128 * 64 + 128 * 3 * 64  # a padded relayout is a copy


def test_roofline_takes_the_slower_of_compute_and_memory_plus_a_fixed_cost_per_op():
    chip, p = C.CHIPS["A15"], C.PARAMETERS
    spilled = 34 * 10**6  # larger than the on-chip buffer: crosses DRAM
    memory_bound = C.OpCost(10**6, spilled, 0, 0, tensors=(spilled,), launches=1)
    compute_bound = C.OpCost(int(15.8e9), 10, 0, 0, tensors=(10,), launches=1)
    assert C.op_seconds(memory_bound, ANE, chip) == pytest.approx(1e-3 + p.op_seconds)
    assert C.op_seconds(compute_bound, ANE, chip) == pytest.approx(1e-3 / p.ane_efficiency + p.op_seconds)
    assert C.op_seconds(compute_bound, CPU, chip) == pytest.approx(15.8e9 / C.CPU_FLOPS + p.op_seconds)
    assert C.op_seconds(C.FREE, ANE, chip) == 0.0  # a view launches nothing


def test_small_activations_stay_on_chip_on_the_ane_only():
    chip, p = C.CHIPS["A15"], C.PARAMETERS
    small = p.on_chip_bytes // 2
    cost = C.OpCost(0, 2 * small, 1000, 0, tensors=(small, small), launches=1)
    assert cost.dram_bytes(ANE) == 1000  # only the weights cross DRAM
    assert cost.dram_bytes(CPU) == 2 * small + 1000
    relayout = C.OpCost(0, 2 * small, 0, 4 * small, tensors=(small, small), relayout_tensors=(small, small),
                        launches=1)
    assert relayout.dram_bytes(ANE) == 4 * small  # a relayout crosses DRAM however small the tensor
    assert C.op_seconds(cost, ANE, chip) == pytest.approx(1000 / chip.dram_bytes_per_s + p.op_seconds)


def test_op_costs_round_trip_through_json():
    x = np.zeros((2, 16, 32), np.float16)
    op = only_op(mil_program(lambda x: mb.linear(x=x, weight=np.ones((24, 32), np.float16)), x=x), "linear")
    cost = C.op_cost(op, ANE)
    assert C.OpCost.from_dict(cost.to_dict()) == cost


def test_every_parameter_says_where_it_comes_from():
    lines = C.parameter_lines()
    assert len(lines) == len(C.PARAMETER_SOURCES) == 6
    assert set(C.FITTED) <= set(C.PARAMETER_SOURCES)
    assert all("fitted" in C.PARAMETER_SOURCES[name] for name in C.FITTED)
    assert any("parameters" in a for a in C.ASSUMPTIONS)


def test_device_partitions_pay_a_dispatch_each_and_a_switch_between():
    table = np.ones((10, 8), np.float16)

    def embed(ids, x):
        return mb.relu(x=mb.add(x=mb.gather(x=table, indices=ids, axis=0), y=x))

    program = mil_program(embed, ids=np.zeros((1, 4), np.int32), x=np.zeros((1, 4, 8), np.float16))
    analysis = analyze(program, "A15")
    assert [(device, len(names)) for device, names in analysis.partitions] == [(CPU, 1), (ANE, 2)]
    assert [r.input_stage for r in analysis.ops] == [True, False, False]
    p = C.PARAMETERS
    assert analysis.latency == pytest.approx(sum(r.seconds for r in analysis.ops)
                                             + 2 * p.dispatch_seconds + p.switch_seconds)
    assert analysis.switches() == [(1, CPU, ANE)]


# Apple, "Deploying Transformers on the Apple Neural Engine" (2022): DistilBERT-base, S=128,
# iPhone 13 (A15).
APPLE_BASELINE_MS, APPLE_OPTIMIZED_MS = 9.89, 3.47
SEQ_LEN = 128


@pytest.fixture(scope="module")
def distilbert_programs():
    """Today's DEFAULT and ane_pipeline() programs (converted once per test session)."""
    return tuple(F.distilbert_base_converted(pipeline, SEQ_LEN)[0]._mil_program for pipeline in ("default", "ane"))


def test_distilbert_estimate_against_apple_anchors(distilbert_programs, record_property):
    before, after = (analyze(program, "A15") for program in distilbert_programs)
    baseline_error = before.latency * 1e3 / APPLE_BASELINE_MS
    optimized_error = after.latency * 1e3 / APPLE_OPTIMIZED_MS
    print(f"\nDistilBERT-base S={SEQ_LEN} on A15: DEFAULT {before.latency * 1e3:.2f} ms vs Apple's baseline "
          f"{APPLE_BASELINE_MS} ms (x{baseline_error:.2f}); ane_pipeline() {after.latency * 1e3:.2f} ms vs "
          f"Apple's optimized {APPLE_OPTIMIZED_MS} ms (x{optimized_error:.2f})")
    record_property("a15_default_ms", before.latency * 1e3)
    record_property("a15_ane_pipeline_ms", after.latency * 1e3)
    assert 0.5 <= baseline_error <= 2.0  # within 2x of Apple's measured baseline (today: 0.56)
    assert 2 / 3 <= optimized_error <= 1.5  # within 1.5x of Apple's optimized model (today: 0.90)
    assert after.latency < before.latency  # the same direction as Apple's rewrite


@pytest.fixture(scope="module")
def distilbert_2022():
    """Apple's 2022 baseline: the same weights in transformers' 2022 attention, converted with
    the coremltools fp16 rule of that year. Returns (model, old form, examples, program)."""
    model, inputs, _ = F.distilbert_base(SEQ_LEN)
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    old_form = DistilBert2022(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(old_form, examples)
    return model, old_form, examples, convert_2022(traced, inputs)._mil_program


def test_the_2022_distilbert_computes_what_todays_computes(distilbert_2022):
    model, old_form, examples, _ = distilbert_2022
    with torch.no_grad():
        today = model(input_ids=examples[0], attention_mask=examples[1]).last_hidden_state
        assert torch.allclose(old_form(*examples), today, atol=1e-4)


def test_the_2022_baseline_fills_its_masks_in_fp32_off_the_ane(distilbert_2022, distilbert_programs):
    fills = [r for r in analyze(distilbert_2022[3], "A15").ops if r.op_type == "select"]
    assert len(fills) == 6  # one per layer, as transformers then built the mask
    assert all(r.device != ANE for r in fills)
    fp32_today = [op for op in distilbert_programs[0].functions["main"].operations
                  if op.op_type == "select" and op.outputs[0].dtype == types.fp32]
    assert fp32_today == []


def test_the_2022_baseline_reproduces_apples_measured_ratio(distilbert_2022, distilbert_programs):
    """A calibration point, not the headline (that is today's DEFAULT: tests/test_analyze_speedup.py)."""
    baseline, after = analyze(distilbert_2022[3], "A15"), analyze(distilbert_programs[1], "A15")
    speedup = baseline.latency / after.latency
    print(f"\nDistilBERT-base S={SEQ_LEN} on A15, built as in 2022: {baseline.latency * 1e3:.2f} ms in "
          f"{len(baseline.partitions)} partitions vs Apple's {APPLE_BASELINE_MS} ms; ane_pipeline() "
          f"{after.latency * 1e3:.2f} ms; predicted speed-up {speedup:.2f}x vs Apple's "
          f"{APPLE_BASELINE_MS / APPLE_OPTIMIZED_MS:.2f}x")
    assert 2 / 3 <= baseline.latency * 1e3 / APPLE_BASELINE_MS <= 1.5  # today: 0.84
    assert speedup >= 2  # issue 16's bar; Apple measured 2.85x


def test_distilbert_after_the_pipeline_is_on_the_ane_outside_its_embeddings(distilbert_programs):
    before, after = (analyze(program, "A15") for program in distilbert_programs)
    assert after.off_ane_outside_input_stage == []
    assert after.ane_flop_share >= 0.99
    assert any(r.op_type == "gather" and r.device == CPU and r.input_stage for r in after.ops)
    assert compare_lines(before, after)[0].startswith("predicted speed-up of ane_pipeline() over DEFAULT on A15: ")


def test_a_compressed_weight_costs_its_stored_bytes():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from milpasses.analyze import analyze
    from tests.helpers import mil_program

    x = np.zeros((1, 64, 1, 8), np.float16)
    dense = np.random.default_rng(0).standard_normal((256, 64, 1, 1)).astype(np.float16)
    indices = np.random.default_rng(0).integers(0, 16, (256, 64, 1, 1)).astype(types.np_uint4_dtype)
    lut = np.random.default_rng(0).standard_normal((1, 1, 1, 1, 16, 1)).astype(np.float16)

    def program(weight):
        return mil_program(lambda x: mb.conv(x=x, weight=weight()), opset=ct.target.iOS18, x=x)

    fp16 = analyze(program(lambda: dense), chip="A15")
    palettized = analyze(program(lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut)), chip="A15")
    (fp16_conv,) = [r for r in fp16.ops if r.op_type == "conv"]
    (palettized_conv,) = [r for r in palettized.ops if r.op_type == "conv"]
    assert fp16_conv.cost.weight_bytes == dense.nbytes
    assert palettized_conv.cost.weight_bytes == dense.size // 2 + lut.size * 2
    assert [r.op_type for r in palettized.ops] == ["conv"]  # decompression happens at load time
