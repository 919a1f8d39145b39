"""check_fp16: names the op where fp16 trouble starts, and the pass that fixes it."""

import numpy as np
from coremltools.converters.mil import Builder as mb

from fixtures import families as F
from milpasses import ane_pipeline, check_fp16
from milpasses.simulator.fp16_check import NO_PASS, sample_inputs
from tests.helpers import mil_program


def test_deberta_default_program_nan_is_traced_to_its_mask_and_softmax():
    inputs = F.sample_inputs("deberta_v2")
    findings = check_fp16(F.converted("deberta_v2", "fp16"), inputs)
    kinds = [(f.kind, f.op_type, f.fix) for f in findings]
    assert kinds[0] == ("inf", "select", "ane::finite_masks")
    assert ("nan", "softmax", "ane::finite_masks") in kinds
    assert check_fp16(F.convert("deberta_v2", "fp16", pass_pipeline=ane_pipeline()), inputs) == []


def test_rms_norm_overflow_names_the_square_and_rms_norm_scale():
    x = (300 * np.random.default_rng(0).standard_normal((1, 2, 8))).astype(np.float16)

    def rms_norm(x):
        mean_square = mb.reduce_mean(x=mb.pow(x=x, y=np.float16(2.0), name="square"), axes=[-1], keep_dims=True)
        return mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=mean_square, y=np.float16(1e-5))))

    (finding,) = check_fp16(mil_program(rms_norm, x=x), {"x": x})
    assert (finding.op, finding.kind, finding.fix) == ("square", "overflow", "ane::rms_norm_scale")
    assert "peaks at" in finding.detail


def test_cancellation_is_a_precision_finding_with_no_pass_to_fix_it():
    x = np.full((4,), 1000.0, np.float16)

    def cancel(x):
        return mb.sub(x=mb.add(x=x, y=np.float16(0.3)), y=x, name="difference")

    (finding,) = check_fp16(mil_program(cancel, x=x), {"x": x})
    assert (finding.op, finding.kind, finding.fix) == ("difference", "precision", NO_PASS)


def test_a_healthy_program_on_sample_inputs_has_no_findings(tmp_path):
    path = tmp_path / "bert.mlpackage"
    F.converted("bert", "fp16").save(str(path))
    inputs = sample_inputs(path)
    assert {k: (v.shape, v.dtype) for k, v in inputs.items()} == {
        "input_ids": ((2, 8), np.int32), "attention_mask": ((2, 8), np.int32)}
    assert (inputs["attention_mask"] == 1).all()
    assert check_fp16(path) == []
