"""The ``torch.export`` route: what coremltools' EXIR (ATen) frontend lacks, and ``export``.

coremltools converts a ``torch.export.ExportedProgram`` with the same torch op registry as a
traced module, looking ops up by their ATen overload names. Importing this module installs,
through that registry (``register_torch_op``), the converters the ATen graphs of transformers
models need and coremltools 9.0 does not have; as in ``torch_ops``, only for ops it lacks.
"""

from __future__ import annotations

from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

from milpasses.errors import ConversionError
from milpasses.frontend.registry import install

#: ATen op kinds (as coremltools names them) that milpasses converts on the torch.export route,
#: with the reason each is missing upstream.
INSTALLED: dict[str, str] = {}


def _upstream(name: str):
    """coremltools' own converter of ``name``, for the ops below that are overloads of it."""
    return _TORCH_OPS_REGISTRY.name_to_func_mapping[name]


def where_scalarother(context, node):
    """``torch.where(cond, x, scalar)``: transformers' masks are built as
    ``where(allowed, 0.0, finfo.min)``; coremltools converts ``where`` with tensor operands, which
    its operand lookup makes of the scalar, but registers only the scalar-self overload."""
    _upstream("where")(context, node)


def bool_and(context, node):
    """``a & b`` of bool masks (``aten.__and__.Tensor``): coremltools converts it as ``and``,
    but does not strip the dunder of an ATen overload name, so looks it up as ``__and__``."""
    _upstream("and")(context, node)


def alias(context, node):
    """``aten.alias``, a view that is the tensor itself (DeBERTa, OPT)."""
    (x,) = _get_inputs(context, node, expected=1)
    context.add(mb.identity(x=x, name=node.name))


def grouped_mm_fallback(context, node):
    """``transformers::grouped_mm_fallback(x, weights, offs)``, the custom op transformers' grouped
    experts call instead of ``torch._grouped_mm`` under export (fp32 weights): the same product,
    converted by milpasses' ``_grouped_mm`` (``torch_ops``) as on the trace route."""
    _upstream("_grouped_mm")(context, node)


def _install(converter, why: str, name: str | None = None) -> None:
    install(converter, why, INSTALLED, name)


_install(where_scalarother, "transformers' masks, where(mask, 0.0, finfo.min); coremltools 9.0 registers "
         "where.scalarself only", name="where.scalarother")
_install(bool_and, "'&' of bool masks; coremltools 9.0 looks aten.__and__ up undunderscored", name="__and__")
_install(alias, "aten.alias; missing in coremltools 9.0")
_install(grouped_mm_fallback, "transformers >= 5 grouped experts under torch.export; a custom op coremltools "
         "cannot know", name="transformers::grouped_mm_fallback")



def _kind(node) -> str:
    """The name coremltools looks an fx node's converter up by (as its ``from_exir_node`` does)."""
    try:
        name = node.target.name()
    except AttributeError:
        name = getattr(node.target, "__name__", str(node.target))
    return sanitize_op_kind(name)


def export(module, example_inputs: tuple):
    """``torch.export`` ``module`` on ``example_inputs`` for ``ct.convert``, as coremltools needs it:
    in eval mode (dropout off), without autograd, non-strict (transformers' Python-level model code
    is traced, not parsed), and decomposed to the ATen inference IR with an empty table
    (``run_decompositions({})``, coremltools' advice), which keeps ``linear``, ``layer_norm`` and
    ``softmax`` whole, as the ``ane::`` passes find them after a trace. The module's training
    mode is restored afterwards.

    Raises ``ConversionError`` when the exported program holds an op that no converter (coremltools'
    or milpasses') converts, naming it, before ``ct.convert`` fails on it halfway."""
    import torch

    if not isinstance(example_inputs, (tuple, list)):
        raise ConversionError(f"example_inputs must be a tuple of the module's positional inputs, got "
                              f"{type(example_inputs).__name__}; pass one tensor as (tensor,)")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(module, tuple(example_inputs), strict=False)
    finally:
        module.train(was_training)
    exported = exported.run_decompositions({})
    missing = sorted({_kind(node) for node in exported.graph_module.graph.nodes if node.op == "call_function"}
                     - set(_TORCH_OPS_REGISTRY.name_to_func_mapping))
    if missing:
        raise ConversionError(f"the exported program holds ops coremltools cannot convert: {', '.join(missing)}; "
                              "register a converter for each with coremltools' register_torch_op, or convert "
                              "the model traced (torch.jit.trace) instead")
    return exported
