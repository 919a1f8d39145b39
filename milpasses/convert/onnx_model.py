"""An ONNX model on the route, verified against ONNX Runtime.

Load and check the model, fix its dynamic dims (batch, sequence length; the graph's own static
dims stand), translate it to MIL (``milpasses.frontend.onnx``), then simulate the converted
program against ONNX Runtime on the same inputs.

With several sequence lengths (``--seq-lens``) the graph is translated and converted once per
length, each at one fixed length exactly as a single-length conversion, and the programs are
written as the functions of one iOS18 multifunction package (``seq_len_16``, ...; weights
shared, the first length the default function). One program with ``ct.EnumeratedShapes`` would
compute at run time every folded value that depends on the length (head reshape shapes, masks,
position slices, rotary tables; counted in docs/cli.md), which the passes read as constants at
one length.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx

from milpasses.convert.coreml import Converted, histogram
from milpasses.convert.options import Options
from milpasses.convert.report import ConversionReport
from milpasses.frontend.function import Function
from milpasses.convert.source import Source, Stages
from milpasses.convert.samples import verification_rows
from milpasses.errors import ConversionError, LibraryFailure, first_line
from milpasses.frontend.onnx.load import OnnxSource, load_onnx
from milpasses.frontend.onnx.translate import UnsupportedOp, input_dtype, to_program

_NUMPY_INPUTS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                 onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def graph_inputs(model) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def function_name(seq_len: int) -> str:
    """The function of a package converted at several sequence lengths that takes ``seq_len`` tokens."""
    return f"seq_len_{seq_len}"


def fixed_shapes(source: OnnxSource, options: Options) -> dict[int | None, dict[str, tuple[int, ...]]]:
    """Each input's shape with its dynamic dims fixed (the first to the batch, any other to the
    sequence length), per sequence length converted, keyed by that length: the sequence axis of
    a 2-D integer input when no axis is dynamic, None when there is none either (images). The
    graph's own static dims stand; a --batch or --seq-len that contradicts them is an error."""
    variants = {}
    for length in options.lengths:
        shapes, seq_len, dynamic_seq = {}, None, False
        for value_info in graph_inputs(source.model):
            dims = []
            for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    if axis == 0 and options.batch_given and dim.dim_value != options.batch:
                        raise ConversionError(
                            f"--batch {options.batch} contradicts {source.path}: its input '{value_info.name}' has a "
                            f"fixed batch of {dim.dim_value} ({_shape_text(value_info)}); convert without --batch")
                    dims.append(dim.dim_value)
                elif axis == 0:
                    dims.append(options.batch)
                else:
                    dims.append(length)
                    dynamic_seq = True
            if len(dims) == 2 and _is_integer(value_info):
                seq_len = dims[1]
            shapes[value_info.name] = tuple(dims)
        if options.lengths_given and not dynamic_seq and (options.enumerated or seq_len != length):
            flag = "--seq-lens" if options.enumerated else f"--seq-len {length}"
            raise ConversionError(f"{flag} contradicts {source.path}: its inputs have fixed shapes "
                                  f"({_shapes_text(shapes)}); convert without it")
        variants[length if dynamic_seq else seq_len] = shapes
    return variants


class OnnxModel(Source):
    """An ONNX graph on the route: translated to MIL at fixed shapes, one function per sequence
    length, verified against ONNX Runtime (and the directory's PyTorch model, when it has one)."""

    frontend = "ONNX"
    task = "the ONNX graph's outputs"

    def __init__(self, model, options: Options):
        self.given, self.options = model, options

    def load(self) -> None:
        self.session_class = _onnxruntime()
        if self.options.enumerated and self.options.target != "iOS18":
            raise ConversionError("--seq-lens on an ONNX model needs --target iOS18: each length becomes a function "
                                  "of one multifunction package (weights shared), and Core ML reads those from iOS "
                                  "18; below it, convert once per length with --seq-len")
        self.source = load_onnx(self.given)
        self.description = str(self.source.path)
        self.model_class = f"ONNX graph {self.source.path.name}"
        self.variants = fixed_shapes(self.source, self.options)
        self.lengths = list(self.variants)
        first = self.variants[self.lengths[0]]
        self.batch = next((shape[0] for shape in first.values() if shape), self.options.batch)
        self.tokenizer = _tokenizer(self.source)

    def _function(self, length) -> Function:
        import coremltools as ct

        shapes = self.variants[length]
        program = _translate(self.source, shapes, getattr(ct.target, self.options.target))
        name = function_name(length) if len(self.lengths) > 1 else "main"
        # The program carries its own inputs and outputs; ct.convert takes none beside it.
        return Function(name, program, None, None)

    def functions(self, stages: Stages) -> list[Function]:
        return [self._function(length) for length in self.lengths]

    def baseline(self) -> Function:
        return self._function(self.lengths[0])

    def report(self, converted: list[Converted]) -> ConversionReport:
        first = converted[0]
        self.renamed = core_ml_names(self.source.model, first.mlmodel)
        output_names = [self.renamed[o.name] for o in self.source.model.graph.output]
        recorded = self.options.recorded(lengths=False)
        recorded.pop("task")
        recorded["batch"] = self.batch
        if self.lengths != [None]:
            recorded.update({"seq_lens": self.lengths} if len(self.lengths) > 1 else {"seq_len": self.lengths[0]})
        report = ConversionReport(model=self.description, task=self.task,
                                  inputs={self.renamed[n]: [list(self.variants[length][n]) for length in self.lengths]
                                          for n in self.variants[self.lengths[0]]},
                                  outputs=output_names, options=recorded, min_psnr_db=self.options.min_psnr_db,
                                  reference="ONNX Runtime")
        if len(converted) > 1:
            report.functions = {item.function.name: {"seq_len": length, "ops": histogram(item.program),
                                                     "sites_rewritten": _sites_rewritten(item.passes)}
                                for length, item in zip(self.lengths, converted)}
        return report

    def verifying(self, mlmodel) -> tuple[str, int]:
        from milpasses.simulator import load_program

        # Read before the DEFAULT comparison starts beside verification: coremltools' program
        # reader and its converter share the builder's global opset context.
        self.several = len(self.lengths) > 1
        self.package = load_program(mlmodel.package_path) if self.several else None
        return ("verifying: simulating the program against ONNX Runtime, beside a DEFAULT-pipeline conversion for "
                "comparison", len(self.lengths) * (verification_rows(self.batch) // self.batch))

    def verify(self, mlmodel, converted: list[Converted], report: ConversionReport, step) -> None:
        from milpasses.simulator import Simulator

        rows = verification_rows(self.batch)
        several, program = self.several, self.package
        session = self.session_class(str(self.source.path), providers=["CPUExecutionProvider"])
        samples = {n: sample_inputs(self.source, shapes, self.tokenizer, rows) for n, shapes in self.variants.items()}
        report.samples = samples[self.lengths[0]][1]
        changed = [f"{a} -> {b}" for a, b in self.renamed.items() if a != b]
        if changed:
            report.samples += f" (ONNX names Core ML does not allow, renamed: {', '.join(changed)})"
        torch_model = _torch_model(self.source, samples[self.lengths[0]][0], report)
        checks = {}
        for length, item in zip(self.lengths, converted):
            if several:
                simulator = Simulator(program, item.function.name)
                device_model = _function_model(mlmodel.package_path, item.function.name)
            else:
                simulator, device_model = Simulator(item.program), (lambda: item.mlmodel)
            checks[length] = _verify(simulator, device_model, session, samples[length][0], self.renamed, length,
                                     self.batch, report, step, torch_model)
        distinct = set(checks.values())
        report.device_check = distinct.pop() if len(distinct) == 1 else "; ".join(f"{n}: {c}" for n, c in checks.items())


def _function_model(package, name: str):
    """The MLModel of one function of ``package``, loaded when the device check asks for it (macOS)."""
    import coremltools as ct

    return lambda: ct.models.MLModel(str(package), function_name=name, compute_units=ct.ComputeUnit.CPU_AND_NE)


def _sites_rewritten(passes: list[dict]) -> dict[str, int]:
    return {p["pass"]: sum(p["rewritten"].values()) for p in passes if p["rewritten"]}


def core_ml_names(model, mlmodel) -> dict[str, str]:
    """ONNX input and output name -> the package's (coremltools renames what Core ML does not
    allow, ``input:0`` to ``input_0``); the program keeps the graph's order."""
    function = mlmodel._mil_program.functions["main"]
    names = dict(zip((i.name for i in graph_inputs(model)), function.inputs))
    names.update(zip((o.name for o in model.graph.output), (v.name for v in function.outputs)))
    return names


def _onnxruntime():
    try:
        from onnxruntime import InferenceSession
    except ImportError as error:
        raise ConversionError("verifying an ONNX model needs ONNX Runtime: pip install onnxruntime") from error
    return InferenceSession


def _translate(source: OnnxSource, shapes, target):
    try:
        return to_program(source.model, shapes, target)
    except UnsupportedOp:
        raise
    except (ValueError, TypeError, IndexError) as error:
        raise LibraryFailure(f"the ONNX graph of {source.path} could not be translated to MIL: "
                             f"{first_line(error)}") from error


def _tokenizer(source: OnnxSource):
    if source.directory is None or not any((source.directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None  # verification falls back to seeded token ids, and says so


def sample_inputs(source: OnnxSource, shapes, tokenizer, rows: int) -> tuple[dict[str, np.ndarray], str]:
    """``rows`` inputs (the first axis) in the ONNX graph's own dtypes, and a description of them:
    real sentences when the directory has a tokenizer, else seeded token ids with every other row
    padded; seeded N(0, 1) values for float inputs."""
    rng = np.random.default_rng(0)
    encoded, what = None, []
    inputs = {}
    for value_info in graph_inputs(source.model):
        name, shape = value_info.name, (rows, *shapes[value_info.name][1:])
        dtype = _NUMPY_INPUTS[input_dtype(value_info)]
        if not _is_integer(value_info):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
            what.append(f"seeded N(0, 1) {name}")
            continue
        if tokenizer is not None and len(shape) == 2:
            encoded = encoded if encoded is not None else _tokenize(tokenizer, rows, shape[1])
            if name in encoded:
                inputs[name] = encoded[name].astype(dtype)
                continue
        if name == "attention_mask" and len(shape) == 2:
            mask = np.ones(shape, dtype)
            mask[1::2, max(1, shape[1] // 2):] = 0
            inputs[name] = mask
        elif name == "input_ids":
            inputs[name] = rng.integers(3, max(_vocab_size(source.model, name), 4), size=shape).astype(dtype)
        elif name == "position_ids" and len(shape) == 2:
            inputs[name] = np.broadcast_to(np.arange(shape[1], dtype=dtype), shape).copy()
        else:
            inputs[name] = np.zeros(shape, dtype)
    if encoded is not None:
        what.insert(0, f"{rows} real sentences, tokenized by the directory's tokenizer, padded to the sequence length")
    elif "input_ids" in inputs:
        what.insert(0, f"{rows} rows of seeded token ids (no tokenizer found), every other row padded")
    return inputs, "; ".join(what)


def _tokenize(tokenizer, rows: int, length: int) -> dict[str, np.ndarray]:
    from milpasses.bundled import SAMPLE_SENTENCES

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    sentences = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(rows)]
    return dict(tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="np"))


#: Ops that pass token ids on unchanged in value (GPT-2's export reshapes input_ids before its embedding).
_ID_PRESERVING = ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity")


def _vocab_size(model, name: str) -> int:
    """The rows of the constant table the input indexes (its embedding), through reshapes and
    casts of it; or 100."""
    tables = {t.name: t.dims for t in model.graph.initializer}
    ids = {name}
    for node in model.graph.node:
        if node.op_type in _ID_PRESERVING and node.input and node.input[0] in ids:
            ids.update(node.output)
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ids and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return 100


def _torch_model(source: OnnxSource, inputs: dict[str, np.ndarray], report):
    """The Hugging Face model the directory also holds (its config and weights beside model.onnx),
    to verify against PyTorch too; None, with the reason in the report's samples, when there is
    none or it cannot take the ONNX graph's inputs."""
    directory = source.directory
    if directory is None or not (directory / "config.json").is_file() \
            or not any((directory / f).is_file() for f in WEIGHT_FILES):
        return None
    import inspect

    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model_class = getattr(transformers, next(iter(config.architectures or []), ""), None) or transformers.AutoModel
        model = model_class.from_pretrained(str(directory), local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, TypeError, KeyError) as error:
        report.samples += f"; not compared with PyTorch: the directory's model did not load ({first_line(error)})"
        return None
    unknown = set(inputs) - set(inspect.signature(model.forward).parameters)
    if unknown:
        report.samples += f"; not compared with PyTorch: {model_class.__name__} takes no {', '.join(sorted(unknown))}"
        return None
    report.samples += f"; also compared with the directory's PyTorch model ({model_class.__name__}, fp32)"
    return model.eval()


def _verify(simulator, device_model, session, inputs, renamed: dict[str, str], seq_len, batch: int, report, step,
            torch_model=None) -> str:
    """Simulate the program (``simulator``, one length's) and run ONNX Runtime on ``inputs`` (keyed
    by ONNX names), a batch at a time; record each output's PSNR at ``seq_len``, per-token outputs
    on real tokens only. With ``torch_model`` (the directory's Hugging Face model), outputs it
    names the same are compared with it too. Returns the device check: on macOS, ``device_model()``
    (the MLModel) run by Core ML against ONNX Runtime."""
    from milpasses.simulator import SimulationError, psnr

    onnx_names = [name for name, core_ml in renamed.items() if core_ml in report.outputs]
    references = {"ONNX Runtime": {n: [] for n in onnx_names}}
    if torch_model is not None:
        references["PyTorch"] = {n: [] for n in onnx_names}
    simulated = {n: [] for n in onnx_names}
    rows = len(next(iter(inputs.values())))
    try:
        for start in range(0, rows, batch):
            chunk = {k: v[start:start + batch] for k, v in inputs.items()}
            for name, value in zip(onnx_names, session.run(onnx_names, chunk)):
                references["ONNX Runtime"][name].append(value)
            if torch_model is not None:
                for name, value in _torch_outputs(torch_model, chunk, onnx_names).items():
                    references["PyTorch"][name].append(value)
            produced = simulator.run(_core_ml_inputs(chunk, renamed))
            for name in onnx_names:
                simulated[name].append(produced[renamed[name]])
            step()
    except SimulationError as error:
        report.verification_error = str(error)
        return "MLModel.predict not run: the simulation failed first"
    valid = inputs["attention_mask"].astype(bool) if "attention_mask" in inputs else None
    for reference, expected in references.items():
        for name in onnx_names:
            if len(expected[name]) != len(simulated[name]):
                continue  # the PyTorch model has no output of this name
            want, got = np.concatenate(expected[name]), np.concatenate(simulated[name])
            if valid is not None and want.ndim > 2 and want.shape[:2] == valid.shape:
                want, got = want[valid], got[valid]  # per-token outputs: real tokens only
            label = renamed[name] if reference == "ONNX Runtime" else f"{renamed[name]} vs PyTorch"
            report.psnr.append({"output": label, "seq_len": seq_len,
                                "psnr_db": round(psnr(want.astype(np.float64), got.astype(np.float64)), 2)})
    if sys.platform != "darwin":
        return "MLModel.predict skipped: Core ML runs only on macOS (the simulated PSNR is the check here)"
    return _device_check(device_model(), session, inputs, renamed, batch, onnx_names)


def _torch_outputs(model, chunk: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        outputs = model(**{k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)
                           for k, v in chunk.items()}, return_dict=True)
    return {n: outputs[n].float().numpy() for n in names if n in outputs}


def _core_ml_inputs(chunk: dict[str, np.ndarray], renamed: dict[str, str]) -> dict[str, np.ndarray]:
    return {renamed[k]: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in chunk.items()}


def _device_check(mlmodel, session, inputs, renamed, batch: int, onnx_names) -> str:
    from milpasses.simulator import psnr

    chunk = {k: v[:batch] for k, v in inputs.items()}
    try:
        predicted = mlmodel.predict(_core_ml_inputs(chunk, renamed))
    except Exception as error:  # Core ML's runtime reports its failures in many types
        return f"MLModel.predict failed: {first_line(error)}"
    expected = session.run(onnx_names, chunk)
    return "MLModel.predict (CPU_AND_NE) against ONNX Runtime: " + ", ".join(
        f"{renamed[n]} {psnr(e, predicted[renamed[n]]):.1f} dB" for n, e in zip(onnx_names, expected))


def _is_integer(value_info) -> bool:
    return input_dtype(value_info) in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _shapes_text(shapes) -> str:
    return ", ".join(f"{n} {'x'.join(str(d) for d in s)}" for n, s in shapes.items())


def _shape_text(value_info) -> str:
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in value_info.type.tensor_type.shape.dim)
