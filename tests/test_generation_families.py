"""Every causal-LM fixture family through the two-function KV-cache package, in both cache
modes: 16 greedy tokens equal to Hugging Face ``generate``, the worst step's logits held to its
DEFAULT twin's (the same steps converted by coremltools' DEFAULT pipeline, fp16 as well), and
the functions in the ANE form (no matmul or linear, attention softmax on axis 1, rank at most 5)."""

import functools
from collections import Counter

import coremltools as ct
import pytest

from fixtures.families import build_model, causal_lm_families
from milpasses.convert.text_generation import build_package
from milpasses.generation.package import TWIN_ALLOWANCE_DB, SimulatedPackage, check_prompt
from milpasses.pipeline import ane_pipeline

CONTEXT, CHUNK = 32, 8
PROMPT = [5, 17, 42, 8, 9, 33, 71, 12, 4, 60, 23]  # one chunk of 8 and a remainder of 3
NEW_TOKENS = 16
FAMILIES = causal_lm_families()
# Below their twins by fp16 rounding order, not by an op the passes compute worse (Qwen2 50.3 dB
# against 53.5, Mixtral 52.9 against 55.2): on the same inputs the two programs agree to 0.0 dB
# without fp16 rounding, and one rounding fewer in DEFAULT (q.k kept exact before its scale)
# moves Qwen2's worst step from 53.5 to 48.9 dB (docs/cli.md, text generation).
BELOW_TWIN_BY_ROUNDING_ORDER = {"qwen2", "mixtral"}


def _family_model(family: str):
    model = build_model(family, FAMILIES[family])
    # No end-of-sequence token: both loops then run all 16 steps (XGLM's fixture picks its
    # EOS first, and the check would compare one token).
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def default_twin_worst_db(tmp_path_factory):
    """Per family, the worst step of its DEFAULT twin on the prompt (whose greedy tokens are
    Hugging Face's too), built once: io and state twins measure the same worst step in every
    family (the cache mode moves the cache, not the arithmetic), so one serves both modes."""
    directory = tmp_path_factory.mktemp("default-twins")

    @functools.cache
    def worst(family: str) -> float:
        model = _family_model(family)
        path = directory / f"{family}.mlpackage"
        build_package(model, CONTEXT, CHUNK, lambda: ct.PassPipeline.DEFAULT, path)
        twin = check_prompt(SimulatedPackage(path), model, PROMPT, CONTEXT, CHUNK, NEW_TOKENS)
        assert twin.produced == twin.expected
        return twin.worst_psnr_db

    return worst


@pytest.mark.parametrize("kv_cache", ["io", "state"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_causal_lm_family_decodes_greedily_like_generate(family, kv_cache, tmp_path, default_twin_worst_db):
    model = _family_model(family)
    path = tmp_path / f"{family}.mlpackage"
    programs, _ = build_package(model, CONTEXT, CHUNK, ane_pipeline, path, kv_cache=kv_cache)

    check = check_prompt(SimulatedPackage(path), model, PROMPT, CONTEXT, CHUNK, NEW_TOKENS, kv_cache=kv_cache)
    assert len(check.expected) == NEW_TOKENS and check.produced == check.expected

    for program in programs.values():
        ops = program.functions["main"].operations
        counts = Counter(op.op_type for op in ops)
        assert counts["matmul"] == counts["linear"] == 0 and counts["einsum"] > 0
        # attention weights (a softmax an einsum reads) over axis 1; Mixtral's router softmax
        # over its experts is no attention
        attention = [op for op in ops if op.op_type == "softmax"
                     and any(child.op_type == "einsum" for child in op.outputs[0].child_ops)]
        assert attention and all(int(op.inputs["axis"].val) % 4 == 1 for op in attention)
        assert max(len(v.shape) for op in ops for v in op.outputs) <= 5

    twin = default_twin_worst_db(family)
    within = check.worst_psnr_db >= twin - TWIN_ALLOWANCE_DB
    if family in BELOW_TWIN_BY_ROUNDING_ORDER:
        assert not within, f"{family} is now within {TWIN_ALLOWANCE_DB} dB of its twin: hold it to the rule"
        pytest.xfail(f"{check.worst_psnr_db:.1f} dB, {twin - check.worst_psnr_db:.1f} dB below its twin's "
                     f"{twin:.1f}: fp16 rounding order")
    assert within, (check.worst_psnr_db, twin)


def test_the_causal_lm_families_are_found_by_behaviour():
    """BERT-like encoders have a causal-LM class in transformers, but the fixture builds them
    bidirectional; every decoder family is found (an empty set would run no test above)."""
    assert {"gpt2", "llama", "qwen2", "gemma2", "falcon", "mixtral", "xglm"} <= set(FAMILIES)
    assert not {"bert", "roberta", "xlm_roberta", "electra"} & set(FAMILIES)
