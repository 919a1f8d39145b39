"""``ane_pipeline()``: coremltools' DEFAULT pass pipeline with the milpasses passes inserted."""

from __future__ import annotations

import coremltools as ct
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

import milpasses.frontend  # noqa: F401  (installs the torch op converters coremltools lacks)
import milpasses.passes  # noqa: F401  (registers the ane:: passes)
from milpasses.passes.base import parse_bool
from milpasses.passes.report import PassReports

PIPELINE_NAME = "ane"

# The ane:: passes run after DEFAULT's fusions, so that they see fused ops (linear with its bias,
# gelu, layer_norm over the last axis), and before its layout clean-up (merging consecutive
# reshapes and transposes, reduce_transposes, remove_redundant_ops), which tidies the boundaries
# they leave. They also run before add_fp16_cast, so the fp16 program is cast from their result.
INSERT_BEFORE = "common::merge_consecutive_reshapes"
# unmerge_leading_axes runs before linear_to_conv, so that a feed-forward on (B*S, C) token rows is
# back on (B, S, C) when its linears become convs, and attention on (B*H, S, d) heads is rank 4.
# attention_to_einsum runs once the projections are convs, so that it reads q, k and v from
# their (B, C, 1, S) outputs, and before bc1s_layout, which then cancels the boundaries it leaves.
# gather_from_transposed_table runs after bc1s_layout, on the transposes it leaves after table
# lookups; fold_unit_transposes runs last, on the transposes attention_to_einsum leaves on masks.
# key_padding_mask runs before attention_to_einsum, which then reads a (B, 1, 1, Sk) mask term;
# gather_to_reshape before it, so that the mask it proves key-only is built from reshapes.
ANE_PASSES = ("ane::finite_masks", "ane::gather_to_reshape", "ane::key_padding_mask", "ane::rms_norm_scale",
              "ane::unmerge_leading_axes", "ane::linear_to_conv",
              "ane::attention_to_einsum", "ane::bc1s_layout", "ane::gather_from_transposed_table",
              "ane::fold_unit_transposes")
# split_wide_outputs changes the program's outputs, so it runs only when asked; after
# fold_unit_transposes, so it sees a conv's exit as the layout passes leave it.
SPLIT_WIDE_OUTPUTS = "ane::split_wide_outputs"

#: ane_pipeline() keyword -> (pass id, the pass's option name). Each option is a pass option,
#: so ``pipeline.set_options(pass_id, {option: value})`` sets the same thing.
OPTIONS = {
    "finite_masks": ("ane::finite_masks", "enabled"),
    "mask_value": ("ane::finite_masks", "mask_value"),
    "gather_to_reshape": ("ane::gather_to_reshape", "enabled"),
    "key_padding_mask": ("ane::key_padding_mask", "enabled"),
    "guard_rms_norm": ("ane::rms_norm_scale", "enabled"),
    "unmerge_leading_axes": ("ane::unmerge_leading_axes", "enabled"),
    "include_matmul": ("ane::linear_to_conv", "include_matmul"),
    "propagate_layout": ("ane::bc1s_layout", "enabled"),
    "gather_from_transposed_table": ("ane::gather_from_transposed_table", "enabled"),
    "fold_unit_transposes": ("ane::fold_unit_transposes", "enabled"),
    "attention": ("ane::attention_to_einsum", "mode"),
    "query_chunk": ("ane::attention_to_einsum", "query_chunk"),
    "max_channels": (SPLIT_WIDE_OUTPUTS, "max_channels"),
}


class AnePipeline(ct.PassPipeline):
    """A coremltools ``PassPipeline`` whose ``ane::`` passes file what they did in ``reports``
    (pass id -> :class:`~milpasses.passes.report.PassReport`), filled when ``ct.convert`` runs it.
    A pipeline serves one conversion: ``ct.convert`` mutates the pipeline it is given."""

    def __init__(self, pass_names: list[str]):
        super().__init__(pass_names, PIPELINE_NAME)
        self.reports = PassReports()


def _fresh(pass_id: str):
    """A new instance of a registered pass, to validate options on without touching the
    instance coremltools runs."""
    return type(PASS_REGISTRY[pass_id])()


def ane_pipeline(**options) -> AnePipeline:
    """A fresh pipeline for ``ct.convert(..., pass_pipeline=ane_pipeline())``; after the
    conversion its ``reports`` say what each ``ane::`` pass rewrote and left alone, and why.

    Every default coremltools pass stays, fp16 casting included. Options:

    - ``finite_masks`` (true): mask constants fp16 cannot hold (-inf, float32 min) become
      ``mask_value`` (-1e4), so a fully masked row never softmaxes to NaN;
    - ``guard_rms_norm`` (true): RMSNorm squares its input divided by its largest magnitude,
      so fp16 ``x ** 2`` cannot overflow;
    - ``unmerge_leading_axes`` (true): work on a view with its two leading axes merged, (B*S, C)
      token rows or (B*H, S, d) heads, runs on the unmerged tensor, so the layout region does
      not break around token rows and attention by ``bmm`` is found;
    - ``include_matmul`` (true): rewrite a ``matmul`` by a constant (GPT-2's Conv1D) as a 1x1 conv too;
    - ``attention`` ("split_einsum"): how attention is rewritten: ``split_einsum`` (per head,
      Apple's recipe), ``split_einsum_v2`` (per head and per chunk of ``query_chunk`` queries),
      ``batched`` (all heads in one einsum pair) or ``off``;
    - ``query_chunk`` (512): the query chunk length of ``split_einsum_v2``;
    - ``propagate_layout`` (true): carry the model's body in (B, C, 1, S) between region boundaries;
      when false each conv keeps its own layout boundaries;
    - ``gather_from_transposed_table`` (true): rows looked up in a constant table (embeddings,
      position and rotary tables) and then turned channels-first are looked up in the table
      stored transposed, with no transpose;
    - ``fold_unit_transposes`` (true): a transpose that only moves size-1 axes joins the reshape
      (or expand_dims, squeeze) above it, through the elementwise ops between (keys-first masks);
    - ``split_wide_outputs`` (false): a conv wider than ``max_channels`` (16384) output channels
      whose channels leave the program as one output ``<name>`` (an LM head) is split into
      convs of at most ``max_channels``, leaving as ``<name>_0 .. <name>_{k-1}`` in channel order,
      for the caller to join; it changes the program's outputs, so it is off unless asked;
    - ``max_channels`` (16384): the widest part ``split_wide_outputs`` leaves (needs it on);
    - ``check`` (false): every ``ane::`` pass simulates the program before and after it runs, on
      seeded inputs, and raises ``TranslationError`` naming the pass, what it rewrote and the
      error when it changed what the program computes; each pass's report records the check.
      The program needs fixed input shapes.
    """
    unknown = sorted(set(options) - set(OPTIONS) - {"check", "split_wide_outputs"})
    if unknown:
        raise ValueError(f"unknown ane_pipeline option(s) {unknown}; the options are "
                         f"{sorted([*OPTIONS, 'check', 'split_wide_outputs'])}")
    passes = ANE_PASSES
    if parse_bool(options.pop("split_wide_outputs", False), "split_wide_outputs"):
        passes += (SPLIT_WIDE_OUTPUTS,)
    elif "max_channels" in options:
        raise ValueError("option 'max_channels' needs split_wide_outputs=True")
    pipeline = AnePipeline(ct.PassPipeline.DEFAULT.passes)
    position = pipeline.passes.index(INSERT_BEFORE)
    for pass_id in reversed(passes):
        pipeline.insert_pass(position, pass_id)
    by_pass: dict[str, dict] = {pass_id: {"reports": pipeline.reports} for pass_id in passes}
    check = options.pop("check", False)
    if parse_bool(check, "check"):
        for pass_id in passes:
            by_pass[pass_id]["check"] = True
    for name, value in options.items():
        pass_id, option = OPTIONS[name]
        setattr(_fresh(pass_id), option, value)  # the pass's own setter validates, now
        by_pass[pass_id][option] = value
    for pass_id, pass_options in by_pass.items():
        pipeline.set_options(pass_id, pass_options)  # replaces, so each pass gets all of its options at once
    return pipeline


def pass_names() -> list[str]:
    """``ane_pipeline()``'s passes by name, in order, for tools that build a coremltools pipeline
    from a list of names: ExecuTorch's Core ML backend takes it as its ``pass_pipeline`` compile
    spec (``CoreMLBackend.generate_compile_specs(pass_names=pass_names())``). The ``ane::``
    passes are registered once ``milpasses.pipeline`` is imported, and run with their defaults:
    a list of names carries no options."""
    return list(ane_pipeline().passes)
