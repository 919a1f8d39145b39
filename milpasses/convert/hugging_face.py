"""A Hugging Face model for its task on the route: loaded in eager attention (``load``), read by
``torch.jit.trace`` or ``torch.export`` with the task's outputs (``trace``), optionally compressed
(``compress``), and verified by simulation against the PyTorch fp32 model (``verify``)."""

from __future__ import annotations

import coremltools as ct
import numpy as np

from milpasses.convert import load, trace, verify
from milpasses.convert.coreml import Converted
from milpasses.convert.options import Options
from milpasses.convert.report import ConversionReport
from milpasses.frontend.function import Function
from milpasses.convert.source import Source, Stages


class HuggingFaceModel(Source):
    def __init__(self, model, options: Options):
        self.given, self.options = model, options
        self.frontend = "torch.export" if options.frontend == "export" else "torch.jit.trace"
        self.compression = None

    def load(self) -> None:
        self.loaded = load.load(self.given, self.options)
        self.description = self.loaded.description
        self.model_class = type(self.loaded.model).__name__
        self.task = self.options.task

    def functions(self, stages: Stages) -> list[Function]:
        from milpasses.convert import compress

        options, compressed_model = self.options, None
        if options.compression is not None:
            self.compression = compress.CompressionRecord(options.compression.scheme)
            if options.compression.scheme == "palettize4":
                with stages.stage("calibrate", "palettizing to 4 bits, calibrated (sensitive k-means)"):
                    compressed_model = compress.calibrated_palettization(
                        self.loaded, options, options.compression.calibration, self.compression)
        self.traced = trace.trace(self.loaded, options, compressed_model)
        return [self._function()]

    def _function(self) -> Function:
        traced, options = self.traced, self.options
        if "pixel_values" in traced.shapes:
            (shape,) = traced.shapes["pixel_values"]
            inputs = [ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)]
        else:
            if options.enumerated:
                shape = ct.EnumeratedShapes(shapes=[(options.batch, n) for n in options.lengths],
                                            default=(options.batch, traced.trace_length))
            else:
                shape = (options.batch, options.lengths[0])
            inputs = [ct.TensorType(name=name, shape=shape, dtype=np.int32) for name in traced.shapes]
        return Function("main", traced.module, inputs, [ct.TensorType(name=n) for n in traced.output_names])

    def compress(self, converted: list[Converted], stages: Stages) -> list[Converted]:
        if self.compression is None:
            return converted
        from milpasses.convert import compress

        (item,) = converted
        scheme = self.compression.scheme
        with stages.stage("compress", f"compressing ({scheme})"):
            mlmodel = compress.compress(item.mlmodel, scheme, self.compression, self.traced, self.loaded, self.options)
        return [Converted(item.function, mlmodel, item.passes)]

    def baseline(self) -> Function:
        return self._function()

    def report(self, converted: list[Converted]) -> ConversionReport:
        recorded = self.options.recorded(takes_images=self.loaded.modality == "vision")
        return ConversionReport(model=self.description, task=self.task, inputs=self.traced.shapes,
                                outputs=self.traced.output_names, options=recorded,
                                min_psnr_db=self.options.min_psnr_db,
                                compression=None if self.compression is None else self.compression.as_dict())

    def verifying(self, mlmodel) -> tuple[str, int]:
        self.lengths = verify.verified_lengths(self.loaded.lengths)
        described = ", ".join(str(n) for n in self.lengths) if self.lengths != [None] else "the sample images"
        return (f"verifying: simulating the program at {described}, beside a DEFAULT-pipeline conversion for "
                f"comparison", verify.simulation_steps(self.lengths, self.options.batch))

    def verify(self, mlmodel, converted: list[Converted], report: ConversionReport, step) -> None:
        verify.verify(mlmodel, self.traced, self.loaded, self.options, self.lengths, report, step)
