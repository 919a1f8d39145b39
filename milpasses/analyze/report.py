"""Analyse a whole program: each op's predicted device and cost, its device partitions and an
estimated latency per chip."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from coremltools.converters.mil.mil import types

from milpasses.analyze import cost as costs
from milpasses.analyze.rules import ANE, COMMUNITY, GPU, Context, Prediction, predict
from milpasses.simulator.core import load_program
from milpasses.weights import is_decompressed


@dataclass(frozen=True)
class OpRecord:
    name: str
    output_name: str  # the first output's name: how Core ML's compute plan names the op
    op_type: str
    input_shapes: tuple
    output_shapes: tuple
    predictions: tuple[Prediction, ...]  # the deciding one first
    cost: costs.OpCost
    seconds: float
    input_stage: bool  # an embedding lookup or preparation of the model's integer inputs

    @property
    def device(self) -> str:
        return self.predictions[0].device


@dataclass
class Analysis:
    chip: costs.Chip
    opset: str
    ops: list[OpRecord]
    partitions: list[tuple[str, list[str]]]  # (device, op names) in execution order
    latency_by_chip: dict[str, float] = field(default_factory=dict)

    @property
    def ops_seconds(self) -> float:
        return sum(r.seconds for r in self.ops)

    @property
    def dispatch_seconds(self) -> float:
        return costs.partition_seconds(len(self.partitions))[0]

    @property
    def switch_seconds(self) -> float:
        return costs.partition_seconds(len(self.partitions))[1]

    def switches(self) -> list[tuple[int, str, str]]:
        """(index of the first op after the switch in execution order, from device, to device)."""
        found, position = [], 0
        for (before, names), (after, _) in zip(self.partitions, self.partitions[1:]):
            position += len(names)
            found.append((position, before, after))
        return found

    def execution_order(self) -> list[OpRecord]:
        """The ops in the order of their partitions (the order the partitions were formed in)."""
        by_name = {r.name: r for r in self.ops}
        return [by_name[name] for _, names in self.partitions for name in names]

    @property
    def latency(self) -> float:
        return self.ops_seconds + self.dispatch_seconds + self.switch_seconds

    def latency_with(self, parameters: costs.CostParameters) -> float:
        """The latency with other per-partition costs (dispatch, switch); the ops' times are kept."""
        return self.ops_seconds + sum(costs.partition_seconds(len(self.partitions), parameters))

    @property
    def ane_op_share(self) -> float:
        return sum(r.device == ANE for r in self.ops) / max(len(self.ops), 1)

    @property
    def ane_flop_share(self) -> float | None:
        """None for a program with no arithmetic (only lookups and layout ops)."""
        total = sum(r.cost.flops for r in self.ops)
        return sum(r.cost.flops for r in self.ops if r.device == ANE) / total if total else None

    @property
    def off_ane_outside_input_stage(self) -> list[OpRecord]:
        return [r for r in self.ops if r.device != ANE and not r.input_stage]

    def bytes_by_kind(self) -> dict[str, int]:
        return {kind: sum(getattr(r.cost, kind) for r in self.ops)
                for kind in ("weight_bytes", "activation_bytes", "relayout_bytes")}


def _shape(var) -> tuple:
    return tuple(var.shape) if types.is_tensor(var.sym_type) else ()


def _weight_bytes(function) -> int:
    """The model's weights as stored: a compressed weight at the size of its compressed parts."""
    return sum(costs.weight_bytes(var) for op in function.operations for var in op.outputs
               if (op.op_type == "const" or is_decompressed(var)) and costs.is_weight(var)
               and not all(is_decompressed(child.outputs[0]) for child in var.child_ops if child.outputs))


def _enumerated_inputs(model, function) -> frozenset:
    """Inputs declared with EnumeratedShapes, from the Core ML spec when there is one."""
    import coremltools as ct

    names = {t.name for t in getattr(function, "input_types", []) or []
             if isinstance(getattr(t, "shape", None), ct.EnumeratedShapes)}
    spec = None
    if hasattr(model, "get_spec"):
        spec = model.get_spec()
    elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        spec = ct.utils.load_spec(str(model))
    if spec is not None:
        for feature in spec.description.input:
            if feature.type.WhichOneof("Type") == "multiArrayType" and \
                    feature.type.multiArrayType.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
                names.add(feature.name)
    return frozenset(names)


def _input_stage(function, ops) -> set[str]:
    """Names of ops that only prepare integer model inputs (token ids, masks), up to and
    including the embedding lookups: a gather from a constant float table ends the stage."""
    stage_vars = {name for name, var in function.inputs.items()
                  if types.is_int(var.dtype) or var.dtype == types.bool}
    stage = set()
    for op in ops:
        activations = [v.name for v in op.get_flattened_inputs() if v.val is None]
        if not all(name in stage_vars for name in activations):
            continue
        stage.add(op.name)
        table = op.inputs.get("x") if op.op_type.startswith("gather") else None
        if table is None or table.val is None or not types.is_float(table.dtype):
            stage_vars.update(v.name for v in op.outputs)
    return stage


def _partitions(ops, devices: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Group ops into device partitions: a topological order that stays on the current device
    while any op there is ready (the runtime may reorder independent ops), else takes the
    earliest ready op in program order."""
    position = {op.name: i for i, op in enumerate(ops)}
    producers = {v.name: op.name for op in ops for v in op.outputs}
    consumers: dict[str, list[str]] = {op.name: [] for op in ops}
    pending = {}
    for op in ops:
        inputs = {producers[v.name] for v in op.get_flattened_inputs() if v.name in producers}
        pending[op.name] = len(inputs)
        for producer in inputs:
            consumers[producer].append(op.name)
    ready: dict[str, list[int]] = {}
    for op in ops:
        if pending[op.name] == 0:
            heapq.heappush(ready.setdefault(devices[op.name], []), position[op.name])
    partitions: list[tuple[str, list[str]]] = []
    while any(ready.values()):
        current = partitions[-1][0] if partitions else None
        if not ready.get(current):
            current = min((heap[0], device) for device, heap in ready.items() if heap)[1]
            partitions.append((current, []))
        name = ops[heapq.heappop(ready[current])].name
        partitions[-1][1].append(name)
        for consumer in consumers[name]:
            pending[consumer] -= 1
            if pending[consumer] == 0:
                heapq.heappush(ready.setdefault(devices[consumer], []), position[consumer])
    return partitions


#: What an op Core ML would put on the ANE does when the ANE is excluded (``CPU_AND_GPU``).
WITHOUT_ANE = Prediction(GPU, "compute units exclude the ANE; the GPU takes what the ANE would run", COMMUNITY,
                         "Core ML runs fp16 ops on the GPU when the Neural Engine is not allowed",
                         rule="compute_units")
COMPUTE_UNITS = ("CPU_AND_NE", "CPU_AND_GPU")


def analyze(model, chip: str = costs.DEFAULT_CHIP, function_name: str = "main",
            compute_units: str = "CPU_AND_NE") -> Analysis:
    """Predict devices and costs for ``model`` (a Program, MLModel or .mlpackage path) on ``chip``,
    with its estimated latency on every chip in ``cost.CHIPS``. ``compute_units="CPU_AND_GPU"``
    predicts the program with the ANE excluded."""
    if compute_units not in COMPUTE_UNITS:
        raise ValueError(f"unknown compute units '{compute_units}'; choose one of {', '.join(COMPUTE_UNITS)}")
    if chip not in costs.CHIPS:
        raise ValueError(f"unknown chip '{chip}'; choose one of {', '.join(costs.CHIPS)}")
    program = load_program(model)
    if function_name not in program.functions:
        raise ValueError(f"the program has no function '{function_name}'; it has {sorted(program.functions)}")
    function = program.functions[function_name]
    weights, enumerated = _weight_bytes(function), _enumerated_inputs(model, function)
    latencies = {name: _analyze_function(function, target, weights, enumerated, compute_units == "CPU_AND_NE")
                 for name, target in costs.CHIPS.items()}
    result = latencies[chip]
    result.latency_by_chip = {name: a.latency for name, a in latencies.items()}
    return result


def _analyze_function(function, chip: costs.Chip, weight_bytes: int, enumerated: frozenset,
                      ane_allowed: bool = True) -> Analysis:
    context = Context(opset=function.opset_version, is_mac=chip.is_mac, weight_bytes=weight_bytes,
                      enumerated_inputs=enumerated)
    # decompression ops run once, when Core ML loads the model; their weights are read by the ops using them
    ops = [op for op in function.operations if op.op_type != "const" and not is_decompressed(op.outputs[0])]
    stage = _input_stage(function, ops)
    records = []
    for op in ops:
        predictions = tuple(predict(op, context))
        if not ane_allowed and predictions[0].device == ANE:
            predictions = (WITHOUT_ANE,) + predictions
        device = predictions[0].device
        cost = costs.op_cost(op, device)
        records.append(OpRecord(
            op.name, op.outputs[0].name if op.outputs else op.name, op.op_type,
            tuple(_shape(v) for v in op.get_flattened_inputs() if v.val is None and not is_decompressed(v)),
            tuple(_shape(v) for v in op.outputs),
            predictions, cost, costs.op_seconds(cost, device, chip), op.name in stage))
    partitions = _partitions(ops, {r.name: r.device for r in records})
    return Analysis(chip, function.opset_version.name, records, partitions)
