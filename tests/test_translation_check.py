"""The per-pass translation check: ``ane_pipeline(check=True)`` and ``milpasses convert
--check-passes`` (the injected bugs it catches are in tests/test_fuzz.py)."""

import json

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses import ane_pipeline
from milpasses.cli import main
from milpasses.passes.translation_check import difference, fingerprint, seeded_inputs
from tests.convert_helpers import save_fixture
from tests.helpers import mil_program


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_fixture(tmp_path_factory.mktemp("models") / "bert", "bert")


def test_seeded_inputs_index_inside_the_table_and_pad_every_row_but_the_first():
    table = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)

    def build(input_ids, attention_mask, x):
        return mb.add(x=mb.gather(x=table, indices=input_ids, axis=0), y=x), mb.cast(x=attention_mask, dtype="fp32")

    examples = {"input_ids": np.zeros((3, 8), np.int32), "attention_mask": np.zeros((3, 8), np.int32),
                "x": np.zeros((3, 8, 4), np.float32)}
    inputs = seeded_inputs(mil_program(build, **examples).functions["main"])
    assert inputs["input_ids"].min() >= 0 and inputs["input_ids"].max() < 7 and len(np.unique(inputs["input_ids"])) > 1
    assert inputs["attention_mask"].sum(axis=1).tolist() == [8, 4, 2]  # whole, then shorter, never empty
    assert inputs["attention_mask"][:, 0].all() and inputs["x"].std() > 0.5


def test_a_result_finite_before_and_not_after_is_an_infinite_error_and_padded_tokens_are_not_compared():
    inputs = {"attention_mask": np.array([[1, 1], [1, 0]], np.int32)}
    before = {"y": np.array([[[1.0], [2.0]], [[4.0], [np.nan]]], np.float32)}
    padded_differs = {"y": np.array([[[1.0], [2.0]], [[4.0], [7.0]]], np.float32)}
    assert difference(inputs, before, padded_differs)["max_rel_error"] == 0.0
    real_differs = {"y": np.array([[[1.0], [2.0]], [[4.04], [7.0]]], np.float32)}
    assert difference(inputs, before, real_differs)["max_rel_error"] == pytest.approx(0.01, rel=1e-3)
    not_finite = {"y": np.array([[[1.0], [np.inf]], [[4.0], [0.0]]], np.float32)}
    assert difference(inputs, before, not_finite)["max_rel_error"] == np.inf


def test_the_fingerprint_a_check_reuses_a_simulation_by_sees_every_change():
    """A pass's "before" is the previous pass's "after" only while the fingerprint is the same."""
    weight = np.ones((4, 4), np.float32)

    def build(x):
        return mb.relu(x=mb.add(x=mb.matmul(x=x, y=weight), y=np.float32(1.0)))

    program = mil_program(build, x=np.zeros((2, 4), np.float32))
    function = program.functions["main"]
    first = fingerprint(function)
    assert fingerprint(function) == first
    const = next(op for op in function.operations if op.op_type == "const" and op.outputs[0].shape == (4, 4))
    const.outputs[0].val[0, 0] = 2.0  # a weight changed in place
    changed_value = fingerprint(function)
    assert changed_value != first
    add = next(op for op in function.operations if op.op_type == "add")
    relu = next(op for op in function.operations if op.op_type == "relu")
    with function:  # the relu now reads the matmul, past the add
        relu.enclosing_block.replace_uses_of_var_after_op(anchor_op=add, old_var=add.outputs[0], new_var=add.x,
                                                          end_op=relu)
    assert fingerprint(function) not in (first, changed_value)


def test_check_is_a_pipeline_option_that_other_options_keep():
    pipeline = ane_pipeline(check=True, attention="batched")
    options = {o.option_name: o.option_val for o in pipeline.get_options("ane::attention_to_einsum")}
    assert options == {"check": True, "mode": "batched", "reports": pipeline.reports}
    assert [o.option_name for o in ane_pipeline().get_options("ane::linear_to_conv")] == ["reports"]
    with pytest.raises(ValueError, match="option 'check' must be true or false"):
        ane_pipeline(check="sometimes")


def test_check_passes_records_each_pass_check_in_the_report(tmp_path, bert_dir, capsys):
    output = tmp_path / "bert.mlpackage"
    assert main(["convert", str(bert_dir), "-o", str(output), "--seq-len", "8", "--offline", "--json",
                 "--check-passes", "--min-psnr", "55"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["check_passes"] is True
    checks = {p["pass"]: p["check"] for p in report["passes"]}
    ane_passes = [name for name in ane_pipeline().passes if name.startswith("ane::")]
    assert sorted(checks) == sorted(ane_passes) and all(c["passed"] and c["max_rel_error"] < 1e-4 for c in checks.values())
    assert checks["ane::attention_to_einsum"]["max_abs_error"] > 0  # per-head einsums reassociate


def test_check_passes_with_several_lengths_is_refused_and_writes_nothing(tmp_path, bert_dir, capsys):
    code = main(["convert", str(bert_dir), "-o", str(tmp_path / "bert.mlpackage"), "--seq-lens", "8,16",
                 "--offline", "--check-passes"])
    assert code == 2
    assert "give one sequence length" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
