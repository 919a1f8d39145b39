"""milpasses' converters and fixes for the ops the 2026 families need (torch_ops_2026): each
against torch on a tiny module, and each fix against coremltools' own converter."""

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil.frontend.torch import ops as upstream
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

import milpasses.frontend  # noqa: F401  (installs the converters)
from milpasses.frontend import torch_ops_2026
from milpasses.simulator import simulate


def _convert(module, *examples):
    traced = torch.jit.trace(module.eval(), examples)
    return ct.convert(traced, inputs=[ct.TensorType(name=f"x{i}", shape=e.shape, dtype=np.float32 if e.is_floating_point()
                                                    else np.int32) for i, e in enumerate(examples)],
                      convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                      compute_precision=ct.precision.FLOAT32, skip_model_load=True)


def _simulated(module, *examples):
    (actual,) = simulate(_convert(module, *examples), {f"x{i}": e.numpy() for i, e in enumerate(examples)}).values()
    return actual


@pytest.fixture
def coremltools_own(monkeypatch):
    """Put coremltools' own converter back under a fixed op's name for one test."""
    def restore(name, converter):
        monkeypatch.setitem(_TORCH_OPS_REGISTRY.name_to_func_mapping, name, converter)
    return restore


class RopeKeys(torch.nn.Module):
    """DeepSeek-V3's keys: two halves of the last axis copied in place."""

    def forward(self, nope, rot):
        keys = nope.new_empty(2, 3, 4, 6)
        keys[..., :4].copy_(nope)
        keys[..., 4:].copy_(rot)
        return keys


class InterleavedRope(torch.nn.Module):
    """Qwen3-VL's interleaved M-RoPE: strided slices of a selected view written in place, the view used after."""

    def forward(self, freqs):
        freqs = freqs * 1.0
        first = freqs[0]
        for index, offset in ((1, 1), (2, 2)):
            first[..., offset:7:3] = freqs[index, ..., offset:7:3]
        return first + 0.0


def test_inplace_copy_on_inner_axes_matches_torch_where_coremltools_fails(coremltools_own):
    nope, rot = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 2)
    np.testing.assert_array_equal(_simulated(RopeKeys(), nope, rot), RopeKeys()(nope, rot).numpy())
    freqs = torch.randn(3, 2, 5, 8)
    np.testing.assert_array_equal(_simulated(InterleavedRope(), freqs), InterleavedRope()(freqs).numpy())
    coremltools_own("_internal_op_tensor_inplace_copy", upstream._internal_op_tensor_inplace_copy)
    with pytest.raises(ValueError, match="updates tensor should have shape"):
        _convert(RopeKeys(), nope, rot)


class GroupMask(torch.nn.Module):
    """The MoE group mask: zeros scattered with an int 1 (GLM-4-MoE)."""

    def forward(self, scores):
        mask = torch.zeros_like(scores)
        mask.scatter_(1, scores.topk(2, dim=1).indices, 1)
        return mask


def test_scatter_of_an_int_value_into_float_data_matches_torch_where_coremltools_fails(coremltools_own):
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(_simulated(GroupMask(), scores), GroupMask()(scores).numpy())
    coremltools_own("scatter", upstream.scatter)
    with pytest.raises(ValueError, match="same data type"):
        _convert(GroupMask(), scores)


class OrMask(torch.nn.Module):
    """transformers' or_masks: a bool scalar from new_zeros, then int zeros of the input's shape."""

    def forward(self, x):
        start = x.new_zeros((), dtype=torch.bool) | (x > 0)
        return start.int() + x.new_zeros(x.shape, dtype=torch.int32)


def test_new_zeros_keeps_the_dtype_and_takes_size_nothing_where_coremltools_fails(coremltools_own):
    x = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.0, 1.0]])
    mlmodel = _convert(OrMask(), x)
    (actual,) = simulate(mlmodel, {"x0": x.numpy()}).values()
    np.testing.assert_array_equal(actual, OrMask()(x).numpy())
    assert actual.dtype == np.int32
    coremltools_own("new_zeros", upstream.new_zeros)
    with pytest.raises(ValueError, match="fill"):
        _convert(OrMask(), x)


class TensorSplits(torch.nn.Module):
    def forward(self, x):
        chunked, rest = torch.tensor_split(x, [5], dim=1)  # Mamba: the whole sequence, nothing left
        head, tail = torch.tensor_split(x, [-2], dim=-1)
        thirds = torch.tensor_split(x, 3, dim=1)  # 5 = 2 + 2 + 1
        return torch.cat([part.reshape(-1) for part in (chunked, rest, head, tail, *thirds)])


def test_tensor_split_by_indices_and_sections_matches_torch():
    x = torch.randn(2, 5, 4)
    np.testing.assert_array_equal(_simulated(TensorSplits(), x), TensorSplits()(x).numpy())


class Buckets(torch.nn.Module):
    def forward(self, x):
        boundaries = torch.tensor([0.0, 0.25, 0.5, 0.75])
        return torch.stack([torch.bucketize(x, boundaries), torch.bucketize(x, boundaries, right=True)])


def test_bucketize_matches_torch_on_and_between_boundaries():
    x = torch.tensor([[-1.0, 0.0, 0.1, 0.25], [0.5, 0.6, 0.75, 2.0]])
    np.testing.assert_array_equal(_simulated(Buckets(), x), Buckets()(x).numpy())


class PolarRope(torch.nn.Module):
    """Llama 4's freqs_cis = polar(ones, angles), read back as real and imaginary parts."""

    def forward(self, x):
        return torch.view_as_real(torch.polar(x * 2.0, x * 3.0))


def test_polar_matches_torch():
    x = torch.randn(3, 4)
    np.testing.assert_allclose(_simulated(PolarRope(), x), PolarRope()(x).numpy(), rtol=1e-5, atol=1e-5)


class IndexAdd(torch.nn.Module):
    """JetMoE's expert outputs gathered back to tokens, a token hit twice."""

    def forward(self, x, index):
        return torch.zeros(4, 3).index_add(0, index, x, alpha=2.0)


def test_index_add_accumulates_repeats_like_torch():
    x, index = torch.randn(5, 3), torch.tensor([3, 0, 3, 1, 3], dtype=torch.int32)
    np.testing.assert_allclose(_simulated(IndexAdd(), x, index), IndexAdd()(x, index).numpy(), rtol=1e-6, atol=1e-6)


class StridedViews(torch.nn.Module):
    def forward(self, x):
        transposed = x.as_strided((6, 4), (1, 6))  # x of (4, 6), transposed
        every_other = x.as_strided((2, 3, 2), (12, 2, 1), 1)  # rows 0 and 2, a window of each
        one_chunk = x.as_strided((1, 4, 6), (24, 6, 1))  # Longformer with one chunk: a reshape
        return torch.cat([transposed.reshape(-1), every_other.reshape(-1), one_chunk.reshape(-1)])


class OverlappingChunks(torch.nn.Module):
    def forward(self, x):
        return x.as_strided((3, 4), (2, 1))  # Longformer's windows overlapping by half


def test_as_strided_views_match_torch_and_overlapping_windows_are_refused():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    np.testing.assert_array_equal(_simulated(StridedViews(), x), StridedViews()(x).numpy())
    with pytest.raises(ValueError, match="as_strided .* is not a reshape, slice or transpose .* overlap"):
        _convert(OverlappingChunks(), torch.arange(8, dtype=torch.float32))


def test_fixes_are_recorded_with_their_reason():
    assert {"_internal_op_tensor_inplace_copy", "scatter", "new_zeros"} <= set(torch_ops_2026.INSTALLED)
    assert _TORCH_OPS_REGISTRY.name_to_func_mapping["scatter"] is torch_ops_2026.scatter
