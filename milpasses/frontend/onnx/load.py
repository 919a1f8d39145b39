"""Finding, loading and checking an ONNX model: a ``.onnx`` file, or a directory holding
``model.onnx`` (its external data beside it, optionally a tokenizer). The graph is checked and
its shapes inferred by ``onnx`` before anything is translated."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from milpasses.errors import ConversionError, first_line
from milpasses.frontend.onnx.fusions import fuse_layer_norms, fuse_tanh_gelus

#: The oldest default-domain opset the frontend reads (LayerNormalization arrived in 17; older
#: exports decompose it, which the DEFAULT pipeline fuses back).
MIN_OPSET = 14
MODEL_FILE = "model.onnx"


@dataclass
class OnnxSource:
    model: object  # onnx.ModelProto, external data loaded
    path: Path  # the .onnx file
    directory: Path | None  # the model directory given, where a tokenizer may be
    opset: int


def is_onnx(model) -> bool:
    """Whether ``model`` names an ONNX model: a path ending in .onnx, or a directory holding model.onnx."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = Path(os.path.expanduser(os.fspath(model)))
    return path.suffix == ".onnx" or (path.is_dir() and (path / MODEL_FILE).is_file())


def load_onnx(model) -> OnnxSource:
    import onnx
    from google.protobuf.message import DecodeError

    given = Path(os.path.expanduser(os.fspath(model)))
    path, directory = (given / MODEL_FILE, given) if given.is_dir() else (given, None)
    if not path.is_file():
        raise ConversionError(f"no ONNX model at {path}: give a .onnx file or a directory holding {MODEL_FILE}")
    try:
        loaded = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as error:
        raise ConversionError(f"{path} is not an ONNX model ({first_line(error)}); give a file "
                              f"written by onnx.save or torch.onnx.export") from error
    if not loaded.graph.node and not loaded.graph.output:
        raise ConversionError(f"{path} is not an ONNX model (no graph in it); give a file written by "
                              f"onnx.save or torch.onnx.export")
    _check_external_data(loaded, path)
    onnx.load_external_data_for_model(loaded, str(path.parent))
    opset = next((o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ConversionError(f"{path} uses ONNX opset {opset}; milpasses reads opsets {MIN_OPSET} to {newest}: "
                              f"re-export with opset_version in that range")
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes(loaded, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ConversionError(f"{path} is not a valid ONNX model: {first_line(error)}") from error
    fuse_layer_norms(loaded)
    fuse_tanh_gelus(loaded)
    return OnnxSource(loaded, path, directory, opset)


def _check_external_data(model, path: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = path.parent / ExternalDataInfo(tensor).location
            if not location.is_file():
                raise ConversionError(f"the external data of {path} is missing: {location} (tensor "
                                      f"'{tensor.name}'); keep the data file beside the .onnx file")
