"""An ONNX model to an ANE-ready ML Program, verified against ONNX Runtime.

The stages mirror the torch route's (``milpasses.convert``): load and check the model, fix its
dynamic dims (batch, sequence length), translate it to MIL, ``ct.convert`` the program with
``ane_pipeline()``, then simulate the converted program against ONNX Runtime on the same inputs,
beside a DEFAULT-pipeline conversion for the report's op comparison.

With several sequence lengths (``--seq-lens``) the graph is translated and converted once per
length, each at one fixed length exactly as a single-length conversion, and the programs are
written as the functions of one iOS18 multifunction package (``seq_len_16``, ...; weights
shared, the first length the default function). One program with ``ct.EnumeratedShapes`` would
compute at run time every folded value that depends on the length (54 to 82 nodes per fixture
family: head reshape shapes, masks, position slices, rotary tables), which the passes read as
constants at one length.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from milpasses.convert.options import Options
from milpasses.errors import ConversionError, LibraryFailure, first_line
from milpasses.convert.samples import verification_rows
from milpasses.onnx.load import OnnxSource, load_onnx
from milpasses.onnx.translate import UnsupportedOp, input_dtype, to_program

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


def check_lengths_target(options: Options) -> None:
    """Several lengths become the functions of one multifunction package, which needs iOS18."""
    if options.enumerated and options.target != "iOS18":
        raise ConversionError("--seq-lens on an ONNX model needs --target iOS18: each length becomes a function "
                              "of one multifunction package (weights shared), and Core ML reads those from iOS 18; "
                              "below it, convert once per length with --seq-len")


def fixed_shapes(source: OnnxSource, options: Options) -> dict[int | None, dict[str, tuple[int, ...]]]:
    """Each input's shape with its dynamic dims fixed (the first to the batch, any other to the
    sequence length), per sequence length converted, keyed by that length: the sequence axis of
    a 2-D integer input when no axis is dynamic, None when there is none either (images)."""
    variants = {}
    for length in options.lengths:
        shapes, seq_len, dynamic_seq = {}, None, False
        for value_info in graph_inputs(source.model):
            dims = []
            for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    dims.append(dim.dim_value)
                elif axis == 0:
                    dims.append(options.batch)
                else:
                    dims.append(length)
                    dynamic_seq = True
            if len(dims) == 2 and _is_integer(value_info):
                seq_len = dims[1]
            shapes[value_info.name] = tuple(dims)
        if options.lengths_given and not dynamic_seq:
            flag = "--seq-lens" if options.enumerated else "--seq-len"
            raise ConversionError(f"{flag} applies to ONNX inputs with a dynamic sequence axis; the inputs of "
                                  f"{source.path} have fixed shapes ({_shapes_text(shapes)}): convert without it")
        variants[length if dynamic_seq else seq_len] = shapes
    return variants


@dataclass
class _Converted:
    """One length's conversion: its program (as converted) and what each pass did to it."""

    mlmodel: object
    passes: list[dict]


def convert_onnx(model, options: Options, new_pipeline, stage):
    """``convert()`` for an ONNX model; ``stage(key, description, steps)`` is its stage context."""
    import coremltools as ct

    import milpasses
    from milpasses.convert.coreml import histogram
    from milpasses.convert.report import ConversionReport
    from milpasses.simulator import Simulator, load_program

    session_class = _onnxruntime()
    check_lengths_target(options)
    with stage("load", "loading the ONNX model"):
        source = load_onnx(model)
        variants = fixed_shapes(source, options)
        tokenizer = _tokenizer(source)
        target = getattr(ct.target, options.target)
    lengths = list(variants)
    several = len(lengths) > 1
    described = f" at {', '.join(str(n) for n in lengths)}, one function per length" if several else ""
    with stage("convert", f"converting with ane_pipeline(){described}"):
        # A length's own model is never run when it becomes a function of the package: not loaded.
        converted = {n: _convert(source, shapes, target, new_pipeline(), options, load=not several)
                     for n, shapes in variants.items()}
        if several:
            package = _write_length_package(converted)
            mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
        else:
            mlmodel = converted[lengths[0]].mlmodel
    first = converted[lengths[0]]
    renamed = core_ml_names(source.model, first.mlmodel)
    output_names = [renamed[o.name] for o in source.model.graph.output]
    recorded = {k: v for k, v in options.recorded(takes_images=lengths == [None]).items() if k != "task"}
    report = ConversionReport(model=str(source.path), task="the ONNX graph's outputs",
                              inputs={renamed[n]: [list(variants[length][n]) for length in lengths]
                                      for n in variants[lengths[0]]},
                              outputs=output_names, options=recorded, min_psnr_db=options.min_psnr_db,
                              reference="ONNX Runtime", passes=first.passes,
                              ops_after=histogram(first.mlmodel._mil_program))
    if several:
        report.functions = {function_name(n): {"seq_len": n, "ops": histogram(c.mlmodel._mil_program),
                                               "sites_rewritten": _sites_rewritten(c.passes)}
                            for n, c in converted.items()}
        program = load_program(str(package))
    rows = verification_rows(options.batch)
    with stage("verify", "verifying: simulating the program against ONNX Runtime, beside a DEFAULT-pipeline "
                         "conversion for comparison", len(lengths) * (rows // options.batch)) as step:
        with ThreadPoolExecutor(max_workers=1) as pool:
            baseline = pool.submit(_default_histogram, source, variants[lengths[0]], target)
            session = session_class(str(source.path), providers=["CPUExecutionProvider"])
            samples = {n: sample_inputs(source, shapes, tokenizer, rows) for n, shapes in variants.items()}
            report.samples = samples[lengths[0]][1]
            changed = [f"{a} -> {b}" for a, b in renamed.items() if a != b]
            if changed:
                report.samples += f" (ONNX names Core ML does not allow, renamed: {', '.join(changed)})"
            torch_model = _torch_model(source, samples[lengths[0]][0], report)
            checks = {}
            for length in lengths:
                inputs = samples[length][0]
                if several:
                    simulator = Simulator(program, function_name(length))
                    device_model = _function_model(package, function_name(length))
                else:
                    simulator, device_model = Simulator(first.mlmodel._mil_program), (lambda: first.mlmodel)
                checks[length] = _verify(simulator, device_model, session, inputs, renamed, length, options.batch,
                                         report, step, torch_model)
            report.ops_before = baseline.result()
    distinct = set(checks.values())
    report.device_check = distinct.pop() if len(distinct) == 1 else "; ".join(f"{n}: {c}" for n, c in checks.items())

    mlmodel.user_defined_metadata["milpasses.version"] = milpasses.__version__
    mlmodel.user_defined_metadata["milpasses.source_model"] = str(source.path)
    mlmodel.short_description = f"{source.path.name}, converted from ONNX for the ANE by milpasses"
    return mlmodel, report


def _convert(source: OnnxSource, shapes, target, pipeline, options: Options, load: bool) -> _Converted:
    """``ct.convert`` of the graph translated at ``shapes``, with ``pipeline``; the model loaded
    by Core ML (macOS only) when ``load``."""
    import coremltools as ct

    program = _translate(source, shapes, target)
    try:
        mlmodel = ct.convert(program, convert_to="mlprogram", pass_pipeline=pipeline,
                             minimum_deployment_target=target, compute_units=ct.ComputeUnit.CPU_AND_NE,
                             skip_model_load=not load or sys.platform != "darwin",
                             compute_precision=_precision(options))
    except (RuntimeError, NotImplementedError, ValueError) as error:
        raise LibraryFailure(f"coremltools could not convert the MIL program of {source.path}: "
                             f"{first_line(error)}") from error
    return _Converted(mlmodel, pipeline.reports.as_dicts())


def _write_length_package(converted: dict[int, _Converted]) -> Path:
    """One multifunction package of the lengths' programs, in a temporary directory removed at
    exit (``save`` copies it to the output); the first length is the default function."""
    import coremltools as ct

    directory = Path(tempfile.mkdtemp(prefix="milpasses-onnx-lengths-"))
    atexit.register(shutil.rmtree, directory, True)
    staging = directory / "lengths"
    descriptor = ct.utils.MultiFunctionDescriptor()
    for length, result in converted.items():
        path = staging / f"{function_name(length)}.mlpackage"
        result.mlmodel.save(str(path))
        descriptor.add_function(str(path), src_function_name="main", target_function_name=function_name(length))
    descriptor.default_function_name = function_name(next(iter(converted)))
    package = directory / "model.mlpackage"
    ct.utils.save_multifunction(descriptor, str(package))
    shutil.rmtree(staging)  # each length's own copy of the weights, now shared in the package
    return package


def _function_model(package: Path, name: str):
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


def _precision(options: Options):
    import coremltools as ct

    return ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32


def _default_histogram(source: OnnxSource, shapes, target) -> dict[str, int]:
    import coremltools as ct

    from milpasses.convert.coreml import histogram

    program = ct.convert(to_program(source.model, shapes, target), convert_to="milinternal",
                         pass_pipeline=ct.PassPipeline.DEFAULT, minimum_deployment_target=target,
                         compute_precision=ct.precision.FLOAT32)
    return histogram(program)


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
