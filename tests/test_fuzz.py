"""The fuzzer: transformer variants drawn by hypothesis (fixtures/fuzz.py), each converted in an
attention mode drawn with it, with the per-pass check on, must compute what torch computes; and a bug injected
into one rewrite is caught both by the fuzzer's property and by the per-pass check, each naming
the pass. benchmarks/fuzz.py runs the same property for as many examples as asked."""

import gc
from collections import Counter
from dataclasses import replace

import pytest
import coremltools as ct
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from fixtures.fuzz import MODES, Case, as_test, cases, check_case, fp16_psnr_db
from milpasses.passes.attention import head_rules
from milpasses.passes.layout import linear_to_conv
from milpasses.passes.shared.matching import NoMatch
from milpasses.passes.translation_check import TranslationError

#: Drawn models, each converted in one attention mode drawn with it: a model is traced and read by
#: the torch frontend once per conversion either way, so one mode per model buys the most models
#: per minute. The three modes that rewrite attention are drawn three times as often as "off"
#: (which leaves attention as DEFAULT does and checks the other passes).
EXAMPLES = 200
DRAWN_MODES = st.sampled_from(tuple(mode for mode in MODES if mode != "off") * 3 + ("off",))
#: Each mode's share of 200 draws is about 60 (20 for "off"); far below that means the draw is broken.
MIN_PER_MODE = {"split_einsum": 40, "split_einsum_v2": 40, "batched": 40, "off": 10}


@pytest.fixture(autouse=True)
def one_torch_thread_and_a_frozen_heap():
    """Tiny tensors: threads only contend (a 1x1 conv is ~10x faster on one thread here). Each
    conversion allocates many small objects, and every full collection would walk the millions
    torch and coremltools hold: frozen, they are left out (about 8% of the fuzzer's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


def test_drawn_transformers_equal_torch_in_their_attention_mode():
    converted = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(), mode=DRAWN_MODES)
    def convert_drawn(case, mode):
        note(as_test(case, (mode,)))
        (outcome,) = check_case(case, modes=(mode,))
        assert outcome.mode == mode
        converted[mode] += 1

    convert_drawn()
    print(f"drawn models per attention mode: {dict(converted)}")
    assert sum(converted.values()) == EXAMPLES, converted
    assert all(converted[mode] >= least for mode, least in MIN_PER_MODE.items()), converted


def _bias_off_by_a_thousandth(monkeypatch):
    """linear_to_conv's conv gets a bias 0.1% too large: invisible at fp16's 60 dB."""
    original = linear_to_conv.linear_to_conv._rewrite

    def rewrite(self, block, site):
        if site.bias is not None:
            site = replace(site, bias=site.bias * 1.001)
        original(self, block, site)

    monkeypatch.setattr(linear_to_conv.linear_to_conv, "_rewrite", rewrite)
    return "ane::linear_to_conv"


def _mean_off_by_a_thousandth(monkeypatch):
    """The transport rule of reduce_mean (q/k RMSNorm inside attention) leaves a factor 1.001."""
    original = head_rules.reduction

    def reduction(op, forms, builder):
        form = original(op, forms, builder)
        return form if isinstance(form, NoMatch) else replace(form, scale=form.scale * 1.001)

    monkeypatch.setitem(head_rules.RULES, "reduce_mean", reduction)
    return "ane::attention_to_einsum"


#: A case both bugs act on: biases, and a q/k RMSNorm carried per head.
BUGGY_CASE = Case(qk_norm="rms", rotary="half", mask="causal_padding", bias=True, seq_len=5)


@pytest.mark.parametrize("inject", [_bias_off_by_a_thousandth, _mean_off_by_a_thousandth])
def test_an_injected_bug_is_caught_by_the_per_pass_check_and_by_the_fuzzer_naming_the_pass(monkeypatch, inject):
    pass_id = inject(monkeypatch)
    with pytest.raises(TranslationError, match=f"{pass_id} changed what the program computes"):
        check_case(BUGGY_CASE, modes=("split_einsum",))
    # The fuzzer's own property (torch against the fp32 program), with the per-pass check off,
    # fails too, and its message names the pass.
    with pytest.raises(AssertionError, match=f"fp32 relative error .*the per-pass check blames it: {pass_id}"):
        check_case(BUGGY_CASE, modes=("split_einsum",), check_passes=False)


def test_the_injected_bugs_case_passes_without_them():
    check_case(BUGGY_CASE, modes=("split_einsum",))


# Cases the fuzzer found (benchmarks/fuzz.py prints them shrunk, ready to paste).

def test_sinks_shifted_by_torch_max_are_rewritten():
    """torch's max leaves an unused argmax reading the scores (DEFAULT removes dead code only
    after the ane:: passes): the scores then had "several consumers" and were left alone."""
    (outcome,) = check_case(Case(sinks=True, gate=True, softcap=5.0, rotary="interleaved", qkv="fused",
                                 mask="sliding", mask_style="inf"), modes=("split_einsum",))
    assert outcome.rewritten == 1


def test_a_constant_causal_mask_under_sinks_is_finite_in_fp16():
    """The same argmax, and the row maximum, kept finite_masks from a float32-min causal mask:
    the fp16 program held -inf (device_limit_violations in check_case)."""
    check_case(Case(hidden=16, heads=1, kv_heads=1, head_dim=4, mask="causal", sinks=True, scale=0.5, norm="rms",
                    post_norm=True, activation="relu", bias=False, seq_len=2, query_chunk=2, seed=512),
               modes=("split_einsum",))


def test_real_tokens_torch_leaves_nan_are_not_compared():
    """Left padding under a causal -inf mask: a padded query sees no key and is NaN in torch, and
    the NaN reaches real tokens in the second layer through 0 * NaN; the program stays finite."""
    check_case(Case(hidden=16, heads=2, kv_heads=1, head_dim=4, layers=2, mask="causal_padding", mask_style="bool",
                    window=2, post_norm=True, activation="silu", bias=False, seq_len=9, query_chunk=2, seed=1323),
               modes=("split_einsum",))


def test_device_limits_name_each_violation():
    from coremltools.converters.mil import Builder as mb
    import numpy as np

    from fixtures.fuzz import device_limit_violations

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1024, 2, 1024)), mb.TensorSpec(shape=(1, 600, 4, 600))])
    def program(big, small):
        too_many = mb.softmax(x=big, axis=1)  # one head's 1024 x 1024 scores
        fine = mb.softmax(x=small, axis=1)  # four heads of 600 x 600, keys first
        deep = mb.reshape(x=fine, shape=[1, 2, 3, 100, 4, 600])
        return too_many, deep, mb.add(x=fine, y=np.float32(np.inf))

    violations = device_limit_violations(program)
    assert len(violations) == 3
    assert "softmax" in violations[0] and "1024" in violations[0]
    assert "rank-6" in violations[1] and "inf or NaN" in violations[2]


def test_a_per_head_layer_norm_rounds_once_in_fp16():
    """A q/k LayerNorm over head_dim was spelled in nine primitive ops (grouped-conv means,
    centring, square, epsilon, rsqrt, scale, gamma, beta), each rounding to fp16: 1.5 dB below
    DEFAULT's one fused layer_norm here (the last long run met 59.5 against 62.5 dB on a case
    like it); one layer_norm per head rounds once, as DEFAULT's does."""
    case = Case(qkv="fused", rotary="half", qk_norm="layer", mask="sliding", mask_style="bool", window=4,
                softcap=5.0, sinks=True, scale=0.5, norm="rms", activation="swiglu", bias=False, batch=3,
                seq_len=13, query_chunk=8, seed=3)
    (outcome,) = check_case(case, modes=("split_einsum",))
    assert outcome.rewritten == 1
    assert outcome.fp16_psnr_db >= fp16_psnr_db(case, ct.PassPipeline.DEFAULT) - 1.0


def test_passes_run_after_another_conversion_name_new_ops_apart_from_the_frontends():
    """Found by the long run (model 1063): the harness runs the passes on a frontend program
    after other conversions have cleared coremltools' op-name counter, so reduce_transposes
    named a new op ``transpose_0`` beside the frontend's own and the program could not be
    simulated. The harness now starts the counter past the program's names, as one ct.convert does."""
    check_case(Case(kv_heads=1, layers=2, qkv="fused", qk_norm="rms", mask="none", mask_style="inf", window=2,
                    gate=True, sdpa=True, norm="rms", activation="relu", bias=False, parallel=True, query_chunk=2,
                    seed=279), modes=("off",))
