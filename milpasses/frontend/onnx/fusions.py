"""Decomposed forms in an ONNX graph put back together before translation.

Exporters before opset 17 write LayerNormalization out as
``(x - mean(x)) / sqrt(mean((x - mean(x)) ** 2) + eps) * gamma + beta``, and before opset 20
the tanh approximation of GELU as ``x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) * 0.5``;
the torch frontend emits one ``layer_norm`` or ``gelu`` for each, so each chain becomes one
node. A chain not fully recognised (another reader of an intermediate, axes other than the
last, a computed epsilon, gamma or beta, other coefficients) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fuse_layer_norms(model: onnx.ModelProto) -> int:
    """Replace each recognised decomposed layer norm of ``model``'s graph, in place; returns how many."""
    graph = model.graph
    readers = _readers(graph)
    constants = _constants(graph)

    def only_reader(name, op_type):
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and found[0] is not None and found[0].op_type == op_type else None

    def last_axis_mean(node):
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1:
            axes = [int(a) for a in np.asarray(constants.get(node.input[1], [])).reshape(-1)]
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        return axes == [-1] and keep == 1

    fused, replaced = 0, {}
    for mean in list(graph.node):
        if mean.op_type != "ReduceMean" or not last_axis_mean(mean) or id(mean) in replaced:
            continue
        x = mean.input[0]
        sub = only_reader(mean.output[0], "Sub")
        if sub is None or list(sub.input) != [x, mean.output[0]]:
            continue
        centred = readers.get(sub.output[0], [])
        power = next((n for n in centred if n is not None and n.op_type == "Pow"), None)
        divide = next((n for n in centred if n is not None and n.op_type == "Div"), None)
        if len(centred) != 2 or power is None or divide is None or divide.input[0] != sub.output[0]:
            continue
        if power.input[1] not in constants or float(np.asarray(constants[power.input[1]])) != 2.0:
            continue
        variance = only_reader(power.output[0], "ReduceMean")
        add_eps = variance and only_reader(variance.output[0], "Add")
        if variance is None or not last_axis_mean(variance) or add_eps is None:
            continue
        eps_name = add_eps.input[1] if add_eps.input[0] == variance.output[0] else add_eps.input[0]
        root = only_reader(add_eps.output[0], "Sqrt")
        if eps_name not in constants or np.size(constants[eps_name]) != 1 or root is None \
                or only_reader(root.output[0], "Div") is not divide:
            continue
        chain = [mean, sub, power, variance, add_eps, root, divide]
        scale = _affine(only_reader(divide.output[0], "Mul"), divide.output[0], constants)
        shift = scale and _affine(only_reader(scale.output[0], "Add"), scale.output[0], constants)
        if scale is None:
            continue  # LayerNormalization needs a scale; an unscaled chain stays
        chain.append(scale)
        inputs, last = [x, _other(scale, divide.output[0])], scale
        if shift is not None:
            chain.append(shift)
            inputs.append(_other(shift, scale.output[0]))
            last = shift
        fused_node = helper.make_node("LayerNormalization", inputs, [last.output[0]], name=f"{mean.name}/fused_layer_norm",
                                      axis=-1, epsilon=float(np.asarray(constants[eps_name])))
        for node in chain:
            replaced[id(node)] = None
        replaced[id(last)] = fused_node
        fused += 1
    _replace_nodes(graph, replaced)
    return fused


def _affine(node, operand: str, constants: dict):
    """``node`` when it combines ``operand`` with a constant vector (gamma or beta), else None."""
    if node is None:
        return None
    other = _other(node, operand)
    return node if other in constants and np.ndim(constants[other]) == 1 else None


def _other(node, operand: str) -> str:
    return node.input[1] if node.input[0] == operand else node.input[0]


def fuse_tanh_gelus(model: onnx.ModelProto) -> int:
    """Replace each recognised tanh-approximated GELU of ``model``'s graph, in place; returns how many."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph)
    constants = _constants(graph)

    def scalar(name, value):
        return name in constants and np.size(constants[name]) == 1 \
            and np.isclose(float(np.asarray(constants[name]).reshape(-1)[0]), value, rtol=1e-4)

    def product(node, value):
        """The other operand of a Mul ``node`` by the constant ``value``, or None."""
        if node is None or node.op_type != "Mul":
            return None
        a, b = node.input
        return b if scalar(a, value) else a if scalar(b, value) else None

    def single(name):
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and found[0] is not None else None

    def is_cube(name, x):
        node = producers.get(name)
        if node is None:
            return []
        if node.op_type == "Pow" and node.input[0] == x and scalar(node.input[1], 3.0):
            return [node]
        if node.op_type == "Mul" and x in node.input:
            square = producers.get(node.input[1] if node.input[0] == x else node.input[0])
            if square is not None and square.op_type == "Mul" and list(square.input) == [x, x] \
                    and len(readers[square.output[0]]) == 1:
                return [square, node]
        return []

    fused, replaced = 0, {}
    for tanh in list(graph.node):
        if tanh.op_type != "Tanh":
            continue
        scaled = producers.get(tanh.input[0])
        inner = product(scaled, 0.7978846)
        total = producers.get(inner) if inner else None
        if total is None or total.op_type != "Add":
            continue
        chain = None
        for x, other in (tuple(total.input), tuple(reversed(total.input))):
            weighted = producers.get(other)
            cube = product(weighted, 0.044715)
            if cube is not None and is_cube(cube, x):
                chain = [*is_cube(cube, x), weighted, total, scaled, tanh]
                break
        if chain is None or any(len(readers.get(n.output[0], [])) != 1 for n in chain):
            continue
        plus_one = single(tanh.output[0])
        if plus_one is None or plus_one.op_type != "Add" or not any(scalar(i, 1.0) for i in plus_one.input):
            continue
        outer = single(plus_one.output[0])
        if outer is None or outer.op_type != "Mul":
            continue
        operand = outer.input[1] if outer.input[0] == plus_one.output[0] else outer.input[0]
        if operand == x:  # x * (1 + tanh) then * 0.5
            half = single(outer.output[0])
            if product(half, 0.5) != outer.output[0]:
                continue
            tail, last = [plus_one, outer, half], half
        elif product(producers.get(operand), 0.5) == x and len(readers[operand]) == 1:  # (0.5 x) * (1 + tanh)
            tail, last = [producers[operand], plus_one, outer], outer
        else:
            continue
        node = helper.make_node("Gelu", [x], [last.output[0]], name=f"{tanh.name}/fused_gelu", approximate="tanh")
        for part in chain + tail:
            replaced[id(part)] = None
        replaced[id(last)] = node
        fused += 1
    _replace_nodes(graph, replaced)
    return fused


def _readers(graph) -> dict[str, list]:
    """Each value's reading nodes; a graph output is read by None (it is never fused away)."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for out in graph.output:
        readers.setdefault(out.name, []).append(None)
    return readers


def _replace_nodes(graph, replaced: dict) -> None:
    """Each node whose id is in ``replaced`` becomes its value there (None: removed), in place."""
    if replaced:
        kept = [replaced.get(id(n), n) for n in graph.node]
        del graph.node[:]
        graph.node.extend(n for n in kept if n is not None)


def _constants(graph) -> dict:
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return constants
