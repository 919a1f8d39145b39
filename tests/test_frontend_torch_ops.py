"""milpasses' torch-frontend converters: they fill gaps and change nothing else."""

import importlib
import tomllib
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from packaging.requirements import Requirement

import milpasses
from milpasses.frontend import torch_ops as frontend
from milpasses.simulator import simulate


def _convert(module, example, input_dtype=np.float32):
    traced = torch.jit.trace(module.eval(), example)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=example.shape, dtype=input_dtype)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )


class NewOnesMask(torch.nn.Module):
    """The transformers-5 masking pattern: a bool scalar from new_ones, combined with a mask."""

    def forward(self, x):
        keep = x.new_ones((), dtype=torch.bool) & (x > 0)
        scale = x.new_ones((x.shape[0], 1))
        return torch.where(keep, x, torch.zeros_like(x)) * scale + x.new_ones(x.shape[1])


def test_new_ones_converts_and_simulates_like_torch():
    x = torch.tensor([[1.5, -2.0, 3.0], [-0.5, 0.25, -4.0]])
    mlmodel = _convert(NewOnesMask(), x)
    (actual,) = simulate(mlmodel, {"x": x.numpy()}).values()
    np.testing.assert_allclose(actual, NewOnesMask()(x).numpy(), rtol=0, atol=0)


def test_new_ones_is_in_the_registry_after_import():
    assert _TORCH_OPS_REGISTRY.get_func("new_ones") is frontend.new_ones
    assert "new_ones" in frontend.INSTALLED


def test_reloading_changes_no_other_converter():
    before = dict(_TORCH_OPS_REGISTRY.name_to_func_mapping)
    importlib.reload(frontend)
    importlib.reload(milpasses)
    after = _TORCH_OPS_REGISTRY.name_to_func_mapping
    changed = {name for name in after if after[name] is not before.get(name)}
    assert changed == set(frontend.INSTALLED)
    assert set(after) == set(before)


def test_an_op_coremltools_already_converts_is_left_to_coremltools(monkeypatch):
    own = _TORCH_OPS_REGISTRY.name_to_func_mapping["logical_or"]

    def logical_or(context, node):  # a would-be milpasses converter for an op upstream has
        raise AssertionError("must never be installed")

    logical_or.__module__ = "somewhere.else"
    monkeypatch.setattr(frontend, "INSTALLED", {})
    frontend._install(logical_or, "test")
    assert _TORCH_OPS_REGISTRY.name_to_func_mapping["logical_or"] is own
    assert frontend.INSTALLED == {}


class IntOfSize(torch.nn.Module):
    """Traces to aten::Int, the converter that numpy 2.4 breaks in coremltools 9.0."""

    def forward(self, x):
        return x.reshape(x.size(0) * x.size(1))


def test_numpy_pin_keeps_the_int_converter_working():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    numpy_requirement = next(
        Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("numpy")
    )
    assert "2.4.0" not in numpy_requirement.specifier
    assert np.__version__ in numpy_requirement.specifier
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert "aten::Int" in str(torch.jit.trace(IntOfSize(), x).graph)
    (actual,) = simulate(_convert(IntOfSize(), x), {"x": x.numpy()}).values()
    np.testing.assert_array_equal(actual, IntOfSize()(x).numpy())


class Histograms(torch.nn.Module):
    """MoE routing's count of tokens per expert (bins = experts over [0, experts - 1]), and a
    histogram over a float range whose values fall outside it, on its edges and on max."""

    def forward(self, x):
        per_expert = torch.histc(x.round().clamp(0, 3), bins=4, min=0, max=3)
        ranged = torch.histc(x, bins=5, min=-1.0, max=2.0)
        return torch.cat([per_expert, ranged])


def test_histc_converts_and_simulates_like_torch():
    x = torch.tensor([[0.0, 1.0, 3.0, 2.0, 7.0, -1.0, 2.0, -0.4], [1.0, 1.2, -3.0, 0.2, 2.9, 0.5, 1.9999, 0.8]])
    (actual,) = simulate(_convert(Histograms(), x), {"x": x.numpy()}).values()
    np.testing.assert_array_equal(actual, Histograms()(x).numpy())
    assert "histc" in frontend.INSTALLED


class DataRange(torch.nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=3)  # min == max == 0: torch takes the range from the data


def test_histc_without_constant_bounds_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="min < max"):
        _convert(DataRange(), torch.randn(6))


EXPERTS, SIZE_IN, SIZE_OUT = 3, 4, 5


class GroupedExperts(torch.nn.Module):
    """transformers' grouped_mm experts: rows sorted by expert, offsets from histc and cumsum,
    one weight matrix per expert (constant, or given as an input)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(EXPERTS, SIZE_OUT, SIZE_IN, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, expert_ids, weight=None):
        offsets = torch.cumsum(torch.histc(expert_ids, bins=EXPERTS, min=0, max=EXPERTS - 1), dim=0, dtype=torch.int32)
        weight = self.weight if weight is None else weight
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def _grouped_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, SIZE_IN)).astype(np.float32)
    expert_ids = np.array([0, 0, 0, 2, 2, 2, 2], np.float32)  # expert 1 gets no rows
    return x, expert_ids


def test_grouped_mm_with_constant_weights_is_one_linear_and_matches_torch():
    x, expert_ids = _grouped_inputs()
    module = GroupedExperts().eval()
    traced = torch.jit.trace(module, (torch.from_numpy(x), torch.from_numpy(expert_ids)))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape),
                                         ct.TensorType(name="expert_ids", shape=expert_ids.shape)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    assert ops.count("linear") == 1 and "matmul" not in ops
    for ids in (expert_ids, np.array([0, 1, 1, 1, 1, 2, 2], np.float32)):
        (actual,) = simulate(mlmodel, {"x": x, "expert_ids": ids}).values()
        with torch.no_grad():
            expected = module(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_with_weights_as_an_input_matches_torch():
    x, expert_ids = _grouped_inputs()
    weight = np.random.default_rng(1).standard_normal((EXPERTS, SIZE_OUT, SIZE_IN)).astype(np.float32)
    module = GroupedExperts().eval()
    examples = tuple(torch.from_numpy(a) for a in (x, expert_ids, weight))
    traced = torch.jit.trace(module, examples)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name=n, shape=a.shape)
                                         for n, a in (("x", x), ("expert_ids", expert_ids), ("weight", weight))],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    (actual,) = simulate(mlmodel, {"x": x, "expert_ids": expert_ids, "weight": weight}).values()
    with torch.no_grad():
        expected = module(*examples).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


class Gate(torch.nn.Module):
    def forward(self, x, y):
        return torch.multiply(x, y)  # recorded as aten::multiply inside a submodule (as in ConvBERT)


class Spellings(torch.nn.Module):
    """view_as, torch.multiply and '|' of bool masks: spellings of ops coremltools converts."""

    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x, y):
        either = (x > 0) | (y < 0.5)
        product = self.gate(x, y).view_as(y.reshape(3, 4)).reshape(12)
        return torch.where(either, product, torch.zeros_like(product))


def test_view_as_multiply_and_bool_or_convert_and_simulate_like_torch():
    x, y = torch.randn(12, generator=torch.Generator().manual_seed(0)), torch.rand(12, generator=torch.Generator().manual_seed(1))
    traced = torch.jit.trace(Spellings().eval(), (x, y))
    graph = str(traced.inlined_graph)
    assert all(f"aten::{op}(" in graph for op in ("view_as", "multiply", "__or__"))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape), ct.TensorType(name="y", shape=y.shape)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    (actual,) = simulate(mlmodel, {"x": x.numpy(), "y": y.numpy()}).values()
    np.testing.assert_array_equal(actual, Spellings()(x, y).numpy())


class IntegerOr(torch.nn.Module):
    """CPM-Ant's int mask | a bool mask, and a bitwise or of integers (negatives in two's complement)."""

    def forward(self, x):
        return torch.stack([x | (x > 2), x | 6, x | -x])


def test_bitwise_or_of_integers_matches_torch_bit_for_bit():
    x = torch.tensor([0, 1, 2, 5, -3, -8, 2**30 + 1, -(2**31)], dtype=torch.int32)
    (actual,) = simulate(_convert(IntegerOr(), x, input_dtype=np.int32), {"x": x.numpy()}).values()
    np.testing.assert_array_equal(actual, IntegerOr()(x).numpy())


class BicubicResize(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, x):
        return torch.nn.functional.interpolate(x, mode="bicubic", **self.options)


@pytest.mark.parametrize("options", [
    dict(size=(7, 4), align_corners=False),  # up in height, down in width
    dict(size=(9, 9), align_corners=True),
    dict(size=(3, 2), align_corners=False, antialias=True),  # _upsample_bicubic2d_aa
    dict(scale_factor=1.5, align_corners=False),
], ids=["size", "align_corners", "antialias", "scale"])
def test_bicubic_resize_converts_and_simulates_like_torch(options):
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    mlmodel = _convert(BicubicResize(**options), x)
    (actual,) = simulate(mlmodel, {"x": x.numpy()}).values()
    np.testing.assert_allclose(actual, BicubicResize(**options)(x).numpy(), rtol=1e-5, atol=1e-5)


class LogSigmoid(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.logsigmoid(x)


def test_log_sigmoid_converts_and_simulates_like_torch_at_large_magnitudes():
    x = torch.tensor([-60.0, -20.0, -1.5, 0.0, 0.3, 4.0, 20.0, 60.0])
    (actual,) = simulate(_convert(LogSigmoid(), x), {"x": x.numpy()}).values()
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, LogSigmoid()(x).numpy(), rtol=1e-5, atol=1e-6)
