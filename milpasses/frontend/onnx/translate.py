"""The ONNX graph, node by node, into a MIL program.

Every input's dynamic dims are fixed first (batch, sequence length), so each ``Shape`` is known
and the shape arithmetic around it (Gather, Concat, Range, ConstantOfShape, Where on constants)
is evaluated at conversion by ONNX's reference implementation: a node whose inputs are all
constants becomes a constant. Only nodes that read the model's inputs become MIL ops, each by
its translator in :mod:`milpasses.frontend.onnx.ops`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from milpasses.errors import ConversionError
from milpasses.frontend.onnx.ops import TRANSLATORS, as_var

_MIL_TYPES = {onnx.TensorProto.FLOAT: types.fp32, onnx.TensorProto.FLOAT16: types.fp16,
              onnx.TensorProto.INT64: types.int32, onnx.TensorProto.INT32: types.int32,
              onnx.TensorProto.BOOL: types.bool}


class UnsupportedOp(ConversionError):
    """A node milpasses cannot translate; the message names its op type and the node."""


class _Context:
    def __init__(self, graph):
        self._readers = Counter(name for node in graph.node for name in node.input)
        self._readers.update(o.name for o in graph.output)

    def readers(self, name: str) -> int:
        """How many nodes (and graph outputs) read the value ``name``."""
        return self._readers[name]

    @staticmethod
    def producer(value):
        return value.op if isinstance(value, Var) else None

    @staticmethod
    def unsupported(node, what: str):
        raise UnsupportedOp(f"ONNX node '{node.name or node.output[0]}' ({node.op_type}): {what} is not "
                            f"supported by milpasses' ONNX frontend")


def input_dtype(value_info) -> int:
    return value_info.type.tensor_type.elem_type


def to_program(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], opset_target) -> Program:
    """A MIL program computing ``model`` at the input ``shapes`` given (one per graph input)."""
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    placeholders = {}
    for value_info in graph.input:
        if value_info.name in constants:
            continue
        mil_type = _MIL_TYPES.get(input_dtype(value_info))
        if mil_type is None:
            raise ConversionError(f"input '{value_info.name}' has ONNX element type "
                                  f"{onnx.TensorProto.DataType.Name(input_dtype(value_info))}; milpasses takes "
                                  f"float, float16, int32, int64 and bool inputs")
        placeholders[value_info.name] = mb.placeholder(shape=shapes[value_info.name], dtype=mil_type)

    context = _Context(graph)
    with Function(placeholders, opset_version=opset_target) as function:
        values: dict[str, object] = {**constants, **function.inputs}
        for node in graph.node:
            _run_node(context, node, values, opset)
        outputs = []
        for value_info in graph.output:
            value = as_var(values[value_info.name])
            if value.op is None or value.op.op_type == "const" or value.name in placeholders \
                    or value in outputs:
                value = mb.identity(x=value)
            value.set_name(value_info.name)
            outputs.append(value)
        function.set_outputs(outputs)
    program = Program()
    program.add_function("main", function)
    return program


def _run_node(context: _Context, node, values: dict, opset: int) -> None:
    if node.domain not in ("", "ai.onnx") and node.op_type not in TRANSLATORS:
        raise UnsupportedOp(f"ONNX node '{node.name or node.output[0]}' is {node.domain}.{node.op_type}, an op "
                            f"outside the standard ONNX domain that milpasses' ONNX frontend does not translate")
    inputs = [values[name] if name else None for name in node.input]
    if not any(isinstance(value, Var) for value in inputs) and node.domain in ("", "ai.onnx") \
            and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
        outputs = _evaluate(node, inputs, opset)
    else:
        translator = TRANSLATORS.get(node.op_type)
        if translator is None:
            raise UnsupportedOp(f"ONNX node '{node.name or node.output[0]}' has op type {node.op_type}, which "
                                f"milpasses' ONNX frontend does not translate (it reads the model's inputs, so it "
                                f"cannot be evaluated at conversion)")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        outputs = translator(context, node, inputs, attrs)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    for name, value in zip(node.output, outputs):
        if name:
            values[name] = value


def _evaluate(node, inputs: list, opset: int) -> list[np.ndarray]:
    """A node on constants, evaluated now by ONNX's reference implementation."""
    if node.op_type == "GatherElements":
        # onnx's reference GatherElements mis-shapes some results (1.23: a (1, 1024) table read at (1, 8)).
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        data, indices = np.asarray(inputs[0]), np.asarray(inputs[1])
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return [np.take_along_axis(data, indices, axis=axis)]
    feeds = {name: value for name, value in zip(node.input, inputs) if name}
    try:
        return ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as error:  # the reference implementation raises many types
        raise UnsupportedOp(f"ONNX node '{node.name or node.output[0]}' ({node.op_type}) could not be evaluated "
                            f"at conversion: {str(error).splitlines()[0] if str(error) else type(error).__name__}") \
            from error
