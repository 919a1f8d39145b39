"""ane_pipeline(): a DEFAULT pipeline with the ane:: passes, safe to use again and again."""

import importlib

import coremltools as ct
import pytest
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

import milpasses
from milpasses import ane_pipeline
from milpasses.pipeline import ANE_PASSES, INSERT_BEFORE
from fixtures import families as F


def test_pipeline_is_default_plus_the_ane_passes_before_the_layout_clean_up():
    pipeline = ane_pipeline()
    default = ct.PassPipeline.DEFAULT.passes
    assert pipeline.pipeline_name == "ane"
    assert [p for p in pipeline.passes if not p.startswith("ane::")] == default
    start = pipeline.passes.index(ANE_PASSES[0])
    assert tuple(pipeline.passes[start:start + len(ANE_PASSES)]) == ANE_PASSES
    assert pipeline.passes[start + len(ANE_PASSES)] == INSERT_BEFORE
    assert "common::add_fp16_cast" in pipeline.passes[start:]


def test_each_call_gives_a_fresh_pipeline():
    first, second = ane_pipeline(), ane_pipeline()
    first.remove_passes(["ane::bc1s_layout"])
    assert "ane::bc1s_layout" in second.passes


@pytest.mark.parametrize("options, message", [
    ({"layout": True}, r"unknown ane_pipeline option\(s\) \['layout'\]; the options are"),
    ({"include_matmul": "sometimes"}, "option 'include_matmul' must be true or false"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ane_pipeline(**options)


def test_option_and_set_options_do_the_same_thing():
    by_keyword = ane_pipeline(include_matmul=False)
    by_set_options = ane_pipeline()
    by_set_options.set_options("ane::linear_to_conv", {"include_matmul": "false"})
    for pipeline in (by_keyword, by_set_options):
        pass_instance = PASS_REGISTRY["ane::linear_to_conv"]
        pass_instance.set_options(pipeline.get_options("ane::linear_to_conv"))
        assert pass_instance.include_matmul is False


def test_set_options_refuses_a_bad_value_when_the_pass_runs():
    pipeline = ane_pipeline()
    pipeline.set_options("ane::bc1s_layout", {"enabled": "perhaps"})
    with pytest.raises(ValueError, match="option 'enabled' must be true or false"):
        F.convert("bert", "fp32", pass_pipeline=pipeline)


def test_converting_many_times_in_one_process_gives_the_same_program():
    histograms = []
    for _ in range(3):
        program = F.convert("bert", "fp32", pass_pipeline=ane_pipeline())._mil_program.functions["main"]
        histograms.append(sorted(op.op_type for op in program.operations))
    assert histograms[0] == histograms[1] == histograms[2]
    assert "conv" in histograms[0]


def test_reimport_and_reload_raise_no_key_error():
    import milpasses.passes.layout.linear_to_conv as module

    importlib.reload(module)
    importlib.reload(importlib.import_module("milpasses.passes.layout.bc1s_layout"))
    importlib.reload(milpasses)
    assert PASS_REGISTRY["ane::linear_to_conv"].__class__.__module__ == module.__name__


def test_a_foreign_pass_with_our_id_is_not_overridden():
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    from milpasses.passes.base import register

    class bc1s_layout(AbstractGraphPass):  # noqa: N801  (somebody else's pass, same name)
        def apply(self, prog):
            pass

    bc1s_layout.__module__ = "somebody.else"
    with pytest.raises(KeyError, match="already registered"):
        register(bc1s_layout)
