"""Installing a torch op converter into coremltools' registry: where coremltools has none, or,
as a fix, in place of coremltools' own where that gives a wrong result."""

from __future__ import annotations

from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op


def install(converter, why: str, installed: dict[str, str], name: str | None = None) -> None:
    """Register ``converter`` for the torch op ``name`` (its own name by default) and record
    ``why`` in ``installed``; an op coremltools converts itself keeps its converter."""
    name = name or converter.__name__
    existing = _TORCH_OPS_REGISTRY.name_to_func_mapping.get(name)
    if existing is not None and not existing.__module__.startswith("milpasses."):
        return  # coremltools converts it itself: leave its converter in charge
    if name != converter.__name__:
        # A name no Python function can have ("or" for `a | b`, "where.scalarother"):
        # register_torch_op takes the name from the function, so set the entry itself.
        _TORCH_OPS_REGISTRY.set_func_by_name(converter, name)
    else:
        register_torch_op(converter, override=existing is not None)
    installed[name] = why


def install_fix(converter, why: str, installed: dict[str, str], name: str | None = None) -> None:
    """Register ``converter`` for ``name`` (its own name by default) in place of coremltools'
    converter, whose result is wrong for some inputs (``why`` says which, recorded in
    ``installed``). The fix hands the inputs coremltools converts right to coremltools' function."""
    name = name or converter.__name__
    _TORCH_OPS_REGISTRY.set_func_by_name(converter, name)
    installed[name] = why
