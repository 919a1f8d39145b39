"""Each MIL op the simulator implements, on a one-op program, against PyTorch."""

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import simulate
from tests.helpers import mil_program

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def t(array):
    return torch.from_numpy(np.asarray(array))


def run(build, opset=ct.target.iOS16, **inputs):
    outputs = simulate(mil_program(build, opset=opset, **inputs), inputs)
    return list(outputs.values())


X4, W4, B4 = randn(2, 4, 9, 9), randn(6, 2, 3, 3), randn(6)
W_LINEAR = randn(5, 6)

# (id, build, inputs, torch reference from the same inputs)
CASES = [
    ("conv2d_stride_dilation_groups_custom_pad_bias",
     lambda x: mb.conv(x=x, weight=W4, bias=B4, strides=[2, 1], dilations=[1, 2], groups=2,
                       pad_type="custom", pad=[1, 0, 2, 1]),
     {"x": X4},
     lambda x: TF.conv2d(TF.pad(t(x), (2, 1, 1, 0)), t(W4), t(B4), stride=(2, 1), dilation=(1, 2), groups=2)),
    ("conv1d_valid_no_bias",
     lambda x: mb.conv(x=x, weight=W4[:, :, 0], pad_type="valid", groups=2),
     {"x": X4[:, :, 0]},
     lambda x: TF.conv1d(t(x), t(W4[:, :, 0]), groups=2)),
    ("conv1x1_is_a_linear_layer",
     lambda x: mb.conv(x=x, weight=W4[:, :1, :1, :1].repeat(4, axis=1), bias=B4),
     {"x": X4[:, :, :1, :]},
     lambda x: TF.conv2d(t(x), t(W4[:, :1, :1, :1].repeat(4, axis=1)), t(B4))),
    # length 8, kernel 3, stride 2: 1 pad in total, after the data for "same", before for "same_lower"
    ("conv_same", lambda x: mb.conv(x=x, weight=W4[:, :, 0], strides=[2], pad_type="same", groups=2),
     {"x": X4[:, :, 0, :8]}, lambda x: TF.conv1d(TF.pad(t(x), (0, 1)), t(W4[:, :, 0]), stride=2, groups=2)),
    ("conv_same_lower", lambda x: mb.conv(x=x, weight=W4[:, :, 0], strides=[2], pad_type="same_lower", groups=2),
     {"x": X4[:, :, 0, :8]}, lambda x: TF.conv1d(TF.pad(t(x), (1, 0)), t(W4[:, :, 0]), stride=2, groups=2)),
    ("einsum_bc1s_scores", lambda a, b: mb.einsum(values=(a, b), equation="nchw,nwhu->nchu"),
     {"a": randn(2, 3, 1, 5), "b": randn(2, 5, 1, 4)},
     lambda a, b: torch.einsum("nchw,nwhu->nchu", t(a), t(b))),
    ("matmul_transpose_y", lambda a, b: mb.matmul(x=a, y=b, transpose_y=True),
     {"a": randn(2, 4, 5, 3), "b": randn(2, 4, 6, 3)}, lambda a, b: t(a) @ t(b).transpose(-1, -2)),
    ("linear", lambda x: mb.linear(x=x, weight=W_LINEAR, bias=B4[:5]), {"x": randn(3, 2, 6)},
     lambda x: TF.linear(t(x), t(W_LINEAR), t(B4[:5]))),
    ("layer_norm_channel_axis_rank4",
     lambda x: mb.layer_norm(x=x, axes=[1], gamma=B4[:4], beta=B4[2:], epsilon=1e-5),
     {"x": randn(2, 4, 1, 7)},
     lambda x: TF.layer_norm(t(x).permute(0, 2, 3, 1), (4,), t(B4[:4]), t(B4[2:])).permute(0, 3, 1, 2)),
    ("layer_norm_last_two_axes_default_epsilon", lambda x: mb.layer_norm(x=x, axes=[-2, -1]),
     {"x": randn(2, 3, 4)}, lambda x: TF.layer_norm(t(x), (3, 4))),
    ("softmax_axis1", lambda x: mb.softmax(x=x, axis=1), {"x": randn(2, 5, 1, 3)}, lambda x: t(x).softmax(1)),
    ("split_sizes", lambda x: mb.split(x=x, split_sizes=[1, 3, 2], axis=1), {"x": randn(2, 6, 1, 3)},
     lambda x: t(x).split([1, 3, 2], dim=1)),
    ("split_even", lambda x: mb.split(x=x, num_splits=3, axis=-1), {"x": randn(2, 6)},
     lambda x: t(x).chunk(3, dim=-1)),
    ("concat", lambda a, b: mb.concat(values=(a, b), axis=1), {"a": randn(2, 3), "b": randn(2, 1)},
     lambda a, b: torch.cat([t(a), t(b)], 1)),
    # shape arithmetic of programs with enumerated shapes concatenates scalars into a vector
    ("concat_scalars", lambda a, b: mb.concat(values=(mb.reduce_sum(x=a), mb.reduce_max(x=b)), axis=0),
     {"a": randn(2, 3), "b": randn(4)}, lambda a, b: torch.stack([t(a).sum(), t(b).max()])),
    ("fill_like", lambda x: mb.fill_like(ref_tensor=x, value=2.5), {"x": randn(2, 3)},
     lambda x: torch.full_like(t(x), 2.5)),
    ("slice_by_index_stride_masks_squeeze",
     lambda x: mb.slice_by_index(x=x, begin=[0, 1, 5], end=[0, 6, 0], stride=[1, 2, -2],
                                 begin_mask=[True, False, False], end_mask=[True, False, True],
                                 squeeze_mask=[False, False, False]),
     {"x": randn(2, 7, 6)}, lambda x: t(np.ascontiguousarray(x[:, 1:6:2, 5::-2]))),
    ("slice_by_index_squeeze_mask",
     lambda x: mb.slice_by_index(x=x, begin=[0, 2], end=[2, 3], squeeze_mask=[False, True]),
     {"x": randn(2, 7)}, lambda x: t(x)[:, 2]),
    ("slice_by_size", lambda x: mb.slice_by_size(x=x, begin=[1, 2], size=[-1, 3]), {"x": randn(3, 7)},
     lambda x: t(x)[1:, 2:5]),
    ("expand_dims_negative", lambda x: mb.expand_dims(x=x, axes=[-2]), {"x": randn(2, 5)},
     lambda x: t(x).unsqueeze(-2)),
    ("squeeze", lambda x: mb.squeeze(x=x, axes=[2]), {"x": randn(2, 3, 1, 4)}, lambda x: t(x).squeeze(2)),
    ("reshape_infer", lambda x: mb.reshape(x=x, shape=[2, -1, 1, 3]), {"x": randn(2, 3, 4)},
     lambda x: t(x).reshape(2, -1, 1, 3)),
    ("transpose", lambda x: mb.transpose(x=x, perm=[0, 2, 3, 1]), {"x": randn(2, 3, 4, 5)},
     lambda x: t(x).permute(0, 2, 3, 1)),
    ("tile", lambda x: mb.tile(x=x, reps=[1, 2, 3]), {"x": randn(2, 3, 1)}, lambda x: t(x).repeat(1, 2, 3)),
    ("reduce_mean_axis1_keep", lambda x: mb.reduce_mean(x=x, axes=[1], keep_dims=True), {"x": randn(2, 5, 1, 3)},
     lambda x: t(x).mean(1, keepdim=True)),
    ("reduce_sum_all", lambda x: mb.reduce_sum(x=x), {"x": randn(2, 5)}, lambda x: t(x).sum()),
    ("reduce_max", lambda x: mb.reduce_max(x=x, axes=[-1]), {"x": randn(2, 5)}, lambda x: t(x).amax(-1)),
    ("gather_rows", lambda x, i: mb.gather(x=x, indices=i, axis=0),
     {"x": randn(10, 4), "i": np.array([[1, 9], [0, 3]], np.int32)},
     lambda x, i: TF.embedding(t(i).long(), t(x))),
    ("gather_batch_dims", lambda x, i: mb.gather(x=x, indices=i, axis=1, batch_dims=1),
     {"x": randn(2, 5, 3), "i": np.array([[4, 0], [2, 2]], np.int32)},
     lambda x, i: torch.stack([t(x)[0, [4, 0]], t(x)[1, [2, 2]]])),
    ("gather_nd", lambda x, i: mb.gather_nd(x=x, indices=i),
     {"x": randn(3, 4, 2), "i": np.array([[0, 1], [2, 3]], np.int32)},
     lambda x, i: torch.stack([t(x)[0, 1], t(x)[2, 3]])),
    ("gather_along_axis", lambda x, i: mb.gather_along_axis(x=x, indices=i, axis=1),
     {"x": randn(2, 5), "i": np.array([[4, 0, 1], [2, 2, 3]], np.int32)},
     lambda x, i: torch.gather(t(x), 1, t(i).long())),
    ("argsort_descending_ties_stable", lambda x: mb.argsort(x=x, axis=1),
     {"x": np.array([[1.0, 3.0, 1.0, 2.0], [0.5, 0.5, 0.5, -1.0]], np.float32)},
     lambda x: torch.sort(t(x), dim=1, descending=True, stable=True).indices.int()),
    ("argsort_ascending_int", lambda x: mb.argsort(x=x, axis=0, ascending=True),
     {"x": np.array([[3, 1], [1, 1], [2, 0]], np.int32)},
     lambda x: torch.sort(t(x), dim=0, stable=True).indices.int()),
    ("topk", lambda x: mb.topk(x=x, k=2, axis=-1), {"x": randn(3, 5)},
     lambda x: (torch.topk(t(x), 2).values, torch.topk(t(x), 2).indices.int())),
    ("scatter_nd_add_repeated", lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u, mode="add"),
     {"d": randn(4, 3), "i": np.array([[2], [0], [2]], np.int32), "u": randn(3, 3)},
     lambda d, i, u: t(d).index_add(0, t(i[:, 0]).long(), t(u))),
    ("scatter_nd_update", lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u, mode="update"),
     {"d": np.zeros(5, np.int32), "i": np.array([[3], [0], [4]], np.int32), "u": np.array([7, 8, 9], np.int32)},
     lambda d, i, u: t(d).index_put((t(i[:, 0]).long(),), t(u))),
    ("scatter_add_repeated_on_axis_1", lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, axis=1, mode="add"),
     {"d": randn(2, 4), "i": np.array([3, 0, 3], np.int32), "u": randn(2, 3)},
     lambda d, i, u: t(d).index_add(1, t(i).long(), t(u))),
    ("scatter_update", lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, axis=0, mode="update"),
     {"d": randn(4, 2), "i": np.array([2, 0], np.int32), "u": randn(2, 2)},
     lambda d, i, u: t(d).index_copy(0, t(i).long(), t(u))),
    ("scatter_along_axis_add", lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=1, mode="add"),
     {"d": randn(3, 5), "i": np.array([[0, 4], [1, 1], [3, 2]], np.int32), "u": randn(3, 2)},
     lambda d, i, u: t(d).scatter_add(1, t(i).long(), t(u))),
    ("scatter_along_axis_update", lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=0,
                                                                         mode="update"),
     {"d": randn(3, 2), "i": np.array([[2, 0]], np.int32), "u": randn(1, 2)},
     lambda d, i, u: t(d).scatter(0, t(i).long(), t(u))),
    ("select", lambda c, a, b: mb.select(cond=c, a=a, b=b),
     {"c": rng.random((2, 3)) > 0.5, "a": randn(2, 3), "b": randn(1, 3)},
     lambda c, a, b: torch.where(t(c), t(a), t(b))),
    ("cast_to_int32_truncates", lambda x: mb.cast(x=x, dtype="int32"), {"x": randn(2, 3) * 5},
     lambda x: t(x).to(torch.int32)),
    ("clip", lambda x: mb.clip(x=x, alpha=-0.5, beta=0.25), {"x": randn(3, 4)}, lambda x: t(x).clamp(-0.5, 0.25)),
    ("band_part_lower", lambda x: mb.band_part(x=x, lower=-1, upper=0), {"x": randn(2, 4, 4)},
     lambda x: torch.tril(t(x))),
    ("band_part_band", lambda x: mb.band_part(x=x, lower=1, upper=2), {"x": randn(5, 6)},
     lambda x: torch.triu(torch.tril(t(x), 2), -1)),
    ("cumsum_int", lambda x: mb.cumsum(x=x, axis=1), {"x": np.array([[1, 0, 1, 1]], np.int32)},
     lambda x: t(x).cumsum(1).int()),
    ("cumsum_exclusive_reverse", lambda x: mb.cumsum(x=x, axis=0, exclusive=True, reverse=True),
     {"x": randn(4, 2)}, lambda x: t(x).flip(0).cumsum(0).flip(0) - t(x)),
    ("gelu_exact", lambda x: mb.gelu(x=x), {"x": randn(50)}, lambda x: TF.gelu(t(x))),
    ("gelu_tanh", lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"), {"x": randn(50)},
     lambda x: TF.gelu(t(x), approximate="tanh")),
    ("gelu_sigmoid", lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"), {"x": randn(50)},
     lambda x: t(x) * torch.sigmoid(1.702 * t(x))),
    ("silu", lambda x: mb.silu(x=x), {"x": randn(50)}, lambda x: TF.silu(t(x))),
    ("erf", lambda x: mb.erf(x=x), {"x": randn(50)}, lambda x: torch.erf(t(x))),
    ("tanh", lambda x: mb.tanh(x=x), {"x": randn(50)}, lambda x: torch.tanh(t(x))),
    ("sigmoid", lambda x: mb.sigmoid(x=x), {"x": randn(50)}, lambda x: torch.sigmoid(t(x))),
    ("relu", lambda x: mb.relu(x=x), {"x": randn(50)}, lambda x: torch.relu(t(x))),
    ("rsqrt_default_epsilon", lambda x: mb.rsqrt(x=x), {"x": np.array([0.0, 4.0], np.float32)},
     lambda x: torch.rsqrt(t(x) + 1e-12)),
    ("pow_and_real_div", lambda x, y: mb.real_div(x=mb.pow(x=x, y=2.0), y=y),
     {"x": randn(3), "y": randn(3)}, lambda x, y: t(x) ** 2 / t(y)),
    ("not_equal_logical_not", lambda x: mb.logical_not(x=mb.not_equal(x=x, y=np.int32(1))),
     {"x": np.array([1, 2, 1], np.int32)}, lambda x: t(x) == 1),
]


@pytest.mark.parametrize("build, inputs, reference", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op_matches_torch(build, inputs, reference):
    actual = run(build, **inputs)
    expected = reference(**inputs)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        want = want.numpy()
        assert got.shape == want.shape
        assert got.dtype == want.dtype or np.issubdtype(got.dtype, np.floating)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_ios18_scaled_dot_product_attention_matches_torch(mask_kind):
    q, k, v = randn(2, 3, 5, 4), randn(2, 3, 6, 4), randn(2, 3, 6, 2)
    masks = {"float": randn(5, 6), "bool": rng.random((2, 1, 5, 6)) > 0.3}
    inputs = {"q": q, "k": k, "v": v}
    if mask_kind == "none":
        build = lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v)  # noqa: E731
    else:
        inputs["m"] = masks[mask_kind]
        build = lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m)  # noqa: E731
    (actual,) = run(build, opset=ct.target.iOS18, **inputs)
    expected = TF.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=None if mask_kind == "none" else t(inputs["m"]))
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_ios18_topk_returns_indices_in_the_dtype_asked_for_or_values_only():
    x = randn(3, 7)
    values, indices = run(lambda x: mb.topk(x=x, k=3, axis=1, output_indices_dtype="uint16"),
                          opset=ct.target.iOS18, x=x)
    expected = torch.topk(t(x), 3, dim=1)
    assert indices.dtype == np.uint16
    np.testing.assert_array_equal(indices, expected.indices.numpy())
    np.testing.assert_allclose(values, expected.values.numpy(), rtol=1e-5, atol=1e-5)
    (smallest,) = run(lambda x: mb.topk(x=x, k=2, axis=0, ascending=True, return_indices=False),
                      opset=ct.target.iOS18, x=x)
    np.testing.assert_allclose(smallest, torch.topk(t(x), 2, dim=0, largest=False).values.numpy(), rtol=1e-5)
