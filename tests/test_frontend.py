"""milpasses' torch-frontend converters: they fill gaps and change nothing else."""

import importlib
import tomllib
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from packaging.requirements import Requirement

import milpasses
from milpasses import frontend
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
    own = _TORCH_OPS_REGISTRY.name_to_func_mapping["new_zeros"]

    def new_zeros(context, node):  # a would-be milpasses converter for an op upstream has
        raise AssertionError("must never be installed")

    new_zeros.__module__ = "somewhere.else"
    monkeypatch.setattr(frontend, "INSTALLED", {})
    frontend._install(new_zeros, "test")
    assert _TORCH_OPS_REGISTRY.name_to_func_mapping["new_zeros"] is own
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
