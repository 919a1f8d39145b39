"""ONNX models in: an ONNX -> MIL frontend written for milpasses.

coremltools dropped its ONNX frontend in 6.0; this one translates an ONNX graph op by op with
coremltools' MIL builder into the op forms coremltools' torch frontend emits for the same model,
so ``ane_pipeline()`` rewrites it unchanged. Modules: ``load`` (find, load and check the model),
``translate`` (the graph walk, with the shape arithmetic folded at conversion) and ``ops`` (one
translator per ONNX op); ``milpasses.convert.onnx_model`` converts and verifies it against ONNX
Runtime.
"""

from milpasses.frontend.onnx.load import is_onnx

__all__ = ["is_onnx"]
