"""Small builders shared by the tests: one-op MIL programs from numpy example inputs."""

import inspect

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

_BUILTIN = {np.dtype(np.float32): types.fp32, np.dtype(np.float16): types.fp16,
            np.dtype(np.int32): types.int32, np.dtype(np.bool_): types.bool}


def mil_program(build, opset=ct.target.iOS16, **examples):
    """A MIL program whose inputs are ``build``'s parameters, typed like ``examples``."""
    names = list(inspect.signature(build).parameters)
    specs = [mb.TensorSpec(shape=examples[n].shape, dtype=_BUILTIN[examples[n].dtype]) for n in names]
    return mb.program(input_specs=specs, opset_version=opset)(build)
