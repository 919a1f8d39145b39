"""``ane_pipeline()``: coremltools' DEFAULT pass pipeline with the milpasses passes inserted."""

from __future__ import annotations

import coremltools as ct

import milpasses.passes  # noqa: F401  (registers the ane:: passes)

PIPELINE_NAME = "ane"

# The ane:: passes run after DEFAULT's fusions, so that they see fused ops (linear with its bias,
# gelu, layer_norm over the last axis), and before its layout clean-up (merging consecutive
# reshapes and transposes, reduce_transposes, remove_redundant_ops), which tidies the boundaries
# they leave. They also run before add_fp16_cast, so the fp16 program is cast from their result.
_INSERT_BEFORE = "common::merge_consecutive_reshapes"

#: option -> (pass ids it switches, default)
_SWITCHES = {
    "linear_to_conv": (("ane::linear_to_conv",), True),
    "bc1s_layout": (("ane::bc1s_layout",), True),
}


def _validated(options: dict) -> dict:
    unknown = sorted(set(options) - set(_SWITCHES))
    if unknown:
        raise ValueError(f"unknown ane_pipeline option(s) {unknown}; the options are {sorted(_SWITCHES)}")
    values = {name: default for name, (_, default) in _SWITCHES.items()}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"ane_pipeline option '{name}' must be True or False, got {value!r}")
        values[name] = value
    if values["bc1s_layout"] and not values["linear_to_conv"]:
        raise ValueError("bc1s_layout=True needs linear_to_conv=True: the layout grows from the convs")
    return values


def ane_pipeline(**options) -> ct.PassPipeline:
    """A fresh pipeline for ``ct.convert(..., pass_pipeline=ane_pipeline())``.

    Options (keyword arguments, all True by default): ``linear_to_conv`` rewrites linear
    layers as 1x1 convs on (B, C, 1, S); ``bc1s_layout`` carries the body of the model in that
    layout. Every default coremltools pass stays, fp16 casting included.
    """
    values = _validated(options)
    pipeline = ct.PassPipeline.DEFAULT  # a new object on every access: convert() mutates it
    position = pipeline.passes.index(_INSERT_BEFORE)
    for name in ("bc1s_layout", "linear_to_conv"):  # inserted in reverse at one position
        pass_ids, _ = _SWITCHES[name]
        if values[name]:
            for pass_id in reversed(pass_ids):
                pipeline.insert_pass(position, pass_id)
    pipeline.pipeline_name = PIPELINE_NAME
    return pipeline
