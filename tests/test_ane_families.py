"""ane_pipeline() on every fixture family: the ANE form, the same function, fp16 quality kept."""


import numpy as np
import pytest

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.passes.shared.bc1s import layout_census
from milpasses.simulator import psnr, simulate

# Region boundaries per family, each an enter or a leave of two layout ops: the embedding sum
# entering and the last hidden state leaving; attention is rewritten inside the region. DeBERTa,
# whose disentangled attention is left alone, also leaves and re-enters around each attention
# block (its three projections leave, its output enters); its (B, S) padding mask enters by a
# reshape and an expand_dims, with no transpose, so it is no boundary.
# ViT and CLIP enter through the patch conv's own reshape, whose transpose cancels the enter's.
BOUNDARIES = {name: 2 for name in F.FAMILIES}
BOUNDARIES["deberta_v2"] = 1 + 4 * F.LAYERS + 1
BOUNDARIES["vit"] = BOUNDARIES["clip_vision"] = 1
# Mixtral's mixture-of-experts routing (top-k, one-hot, gathers on (B*S, C) rows) stays as it
# is, as issue 11 allows: the region is left and re-entered around each sparse block.
BOUNDARIES["mixtral"] = 2 + 2 * F.LAYERS
LAYOUT_OPS = ("transpose", "reshape", "expand_dims", "squeeze")


converted_ane = F.converted_ane


def _main(mlmodel):
    return mlmodel._mil_program.functions["main"]


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_no_linear_and_no_matmul_by_a_constant_remain(name):
    ops = _main(converted_ane(name, "fp16")).operations
    assert not [op for op in ops if op.op_type == "linear"]
    by_constant = [op for op in ops if op.op_type == "matmul" and
                   (op.inputs["x"].val is not None or op.inputs["y"].val is not None)]
    if name == "deberta_v2":
        # Disentangled attention multiplies each head by its own slice of a constant relative
        # position table: a batched product by a rank-3 constant, not a linear layer.
        assert by_constant and all(op.inputs["y"].rank == 3 for op in by_constant)
    else:
        assert not by_constant
    assert [op for op in ops if op.op_type == "conv"]


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_norms_run_over_the_channel_axis_of_rank4(name):
    ops = _main(converted_ane(name, "fp32")).operations
    norms = [op for op in ops if op.op_type == "layer_norm"]
    rms_means = [op for op in ops if op.op_type == "reduce_mean" and op.inputs["x"].op.op_type == "pow"]
    assert norms or rms_means
    for op in norms + rms_means:
        assert op.inputs["axes"].val.tolist() == [1] and op.inputs["x"].rank == 4, op.name


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_layout_ops_stand_only_at_region_boundaries(name):
    ane = layout_census(_main(converted_ane(name, "fp32")))
    default_layout_ops = sum(op.op_type in LAYOUT_OPS for op in _main(F.converted(name, "fp32")).operations)
    assert ane["boundary"] == 2 * BOUNDARIES[name]
    # attention's own reshapes and transposes, no more; inside Mixtral's routing, which stays,
    # its experts' convs each enter and leave (1, C, 1, N) rows.
    experts = 2 * F.LAYERS if name == "mixtral" else 0
    assert ane["other"] <= default_layout_ops + experts


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_fp32_program_equals_default_and_torch(name):
    inputs = F.sample_inputs(name)
    valid = F.valid_tokens(inputs)  # padded queries are undefined (see finite_masks)
    expected = F.torch_reference(name, inputs)[valid]
    ane = simulate(converted_ane(name, "fp32"), inputs)["last_hidden_state"]
    assert np.all(np.isfinite(ane))
    ane = ane[valid]
    default = simulate(F.converted(name, "fp32"), inputs)["last_hidden_state"][valid]
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(ane - expected)) / scale < 1e-5
    assert np.max(np.abs(ane - default)) / scale < 1e-5


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_fp16_psnr_above_60_or_within_1_db_of_default(name):
    # DeBERTa's DEFAULT fp16 program is NaN on a padded batch (its -inf mask); compare unpadded.
    inputs = F.sample_inputs(name, padded=name != "deberta_v2")
    valid = F.valid_tokens(inputs)
    expected = F.torch_reference(name, inputs)[valid]
    ane = psnr(expected, simulate(converted_ane(name, "fp16"), inputs)["last_hidden_state"][valid])
    default = psnr(expected, simulate(F.converted(name, "fp16"), inputs)["last_hidden_state"][valid])
    # Issue 11's bar: 60 dB on valid tokens, or within 1 dB of DEFAULT where DEFAULT is below 61.
    # Rounding in another order costs the 2-layer fixtures up to 2 dB against DEFAULT (measured:
    # RoBERTa 66.0 against 67.4, ModernBERT 65.9 against 67.9, Gemma 2 65.5 against 66.7).
    assert ane >= (60.0 if default >= 61.0 else default - 1.0)


@pytest.mark.parametrize("name", list(F.FAMILIES))
def test_output_keeps_its_name_shape_and_dtype(name):
    default, ane = _main(F.converted(name, "fp16")).outputs, _main(converted_ane(name, "fp16")).outputs
    assert [(v.name, v.shape, v.dtype) for v in ane] == [(v.name, v.shape, v.dtype) for v in default]


@pytest.mark.parametrize("name", F.TEXT_FAMILIES)
@pytest.mark.parametrize("last_row_tokens", [F.PADDED_LENGTH, 1], ids=["padded", "one_token_row"])
def test_fp16_padded_batches_stay_finite_and_accurate_on_valid_tokens(name, last_row_tokens):
    inputs = F.sample_inputs(name, last_row_tokens=last_row_tokens)
    expected = F.torch_reference(name, inputs)
    actual = simulate(converted_ane(name, "fp16"), inputs)["last_hidden_state"]
    assert np.all(np.isfinite(actual))
    valid = F.valid_tokens(inputs)
    assert psnr(expected[valid], actual[valid]) >= 60.0


def test_deberta_nan_is_fixed_by_finite_masks_and_not_otherwise():
    inputs = F.sample_inputs("deberta_v2")
    unguarded = F.convert("deberta_v2", "fp16", pass_pipeline=ane_pipeline(finite_masks=False))
    assert np.isnan(simulate(unguarded, inputs)["last_hidden_state"]).any()
    assert np.isfinite(simulate(converted_ane("deberta_v2", "fp16"), inputs)["last_hidden_state"]).all()
