"""What every milpasses pass shares: registration in the ``ane`` namespace, the program
preconditions, the report, and debug logging of every site left alone."""

from __future__ import annotations

import logging
import time

from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

from milpasses.passes.report import PassReport
from milpasses.passes.translation_check import PassCheck

NAMESPACE = "ane"
logger = logging.getLogger("milpasses.passes")


def register(pass_class):
    """Register ``pass_class`` as ``ane::<class name>``.

    Registering an id twice raises KeyError in coremltools; a reload of milpasses
    re-registers its own class, which is allowed, while a clash with anybody else's is not.
    """
    pass_id = f"{NAMESPACE}::{pass_class.__name__}"
    existing = PASS_REGISTRY.passes.get(pass_id)
    ours = existing is not None and existing.__module__ == pass_class.__module__
    return register_pass(namespace=NAMESPACE, override=ours)(pass_class)


def parse_bool(value, option: str) -> bool:
    """Options arrive as Python values from ane_pipeline() or as text from set_options()."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"option '{option}' must be true or false, got {value!r}")


class PassOption:
    """A pass option: set from Python, or as text through ``set_options``, which coremltools
    applies with ``setattr``; either way ``parse`` checks the value."""

    def __init__(self, default):
        self.default = default

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        return self if instance is None else instance.__dict__.get(self.name, self.default)

    def __set__(self, instance, value) -> None:
        instance.__dict__[self.name] = self.parse(value)

    def parse(self, value):
        raise NotImplementedError


class BoolOption(PassOption):
    def __init__(self, default: bool = True):
        super().__init__(default)

    def parse(self, value) -> bool:
        return parse_bool(value, self.name)


class PositiveIntOption(PassOption):
    def parse(self, value) -> int:
        if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
            raise ValueError(f"option '{self.name}' must be a positive integer, got {value!r}")
        return int(value)


def count_ops(block) -> int:
    return sum(op.op_type != "const" for op in block.operations)


class AnePass(AbstractGraphPass):
    """A pass over the main function's top-level block, which reports what it did.

    Every milpasses pass has the option ``enabled`` (default true); a disabled pass leaves the
    program untouched and reports nothing rewritten. With ``check`` (default false) the pass
    simulates the program before and after it runs and raises
    :class:`~milpasses.passes.translation_check.TranslationError` if it changed what the
    program computes (``ane_pipeline(check=True)`` sets it on every pass). ``reports`` is where
    the run files its report besides ``self.report``: the :class:`PassReports` of the pipeline
    being run (``ane_pipeline()`` sets it on every pass).
    """

    enabled = BoolOption()
    check = BoolOption(default=False)
    reports = None

    def set_options(self, pass_options=None) -> None:
        """coremltools calls this before every run, with the options of the pipeline being
        run (None when it has none). Every run starts from the defaults, so an option set by
        one pipeline never leaks into the next one's conversion."""
        self.__dict__.clear()
        self.__dict__.update(type(self)().__dict__)
        super().set_options(pass_options)

    @property
    def pass_id(self) -> str:
        return f"{NAMESPACE}::{type(self).__name__}"

    def apply(self, prog) -> None:
        self.report = PassReport(self.pass_id)
        if self.reports is not None:
            self.reports[self.pass_id] = self.report
        if not self.enabled:
            return
        if len(prog.functions) != 1 or "main" not in prog.functions:
            self.skip("program", f"the program has functions {sorted(prog.functions)}, not one 'main'")
            return
        block = prog.functions["main"]
        for op in block.operations:
            if op.blocks:
                self.skip(op.name, f"'{op.op_type}' holds nested blocks this pass does not enter")
        self.report.ops_before = count_ops(block)
        translation = PassCheck(prog) if self.check else None
        started = time.perf_counter()
        with block:  # the builder adds ops to the block whose context is open
            self.run(block)
        self.report.seconds = time.perf_counter() - started
        self.report.ops_after = count_ops(block)
        if translation is not None:
            translation.verify(self.report)

    def run(self, block) -> None:
        raise NotImplementedError

    def rewrite_each(self, block, op_types, match, rewrite) -> None:
        """For every live op of ``op_types``: ``match(op)`` (which never mutates) gives a site,
        a NoMatch, or None for an op that is no candidate at all; sites go to
        ``rewrite(block, site)``, reasons to the report."""
        for op in list(block.operations):
            if op.op_type not in op_types or op.enclosing_block is None:
                continue
            site = match(op)
            if site is None:
                continue
            if not site:
                self.skip(op.name, site.reason)
                continue
            rewrite(block, site)

    @staticmethod
    def remove_dead(block, ops) -> None:
        """Remove ``ops`` and, transitively, every op (constants included) that only they read.

        A dead weight left for DEFAULT's clean-up would be cast to fp16 and overflow-checked
        for nothing; an op still read by anyone, or a block output, stays.
        """
        pending = list(ops)
        while pending:
            op = pending.pop()
            if op.enclosing_block is None or any(v.child_ops or v in block.outputs for v in op.outputs):
                continue
            producers = [v.op for v in op.get_flattened_inputs() if v.op is not None]
            block.remove_ops([op])
            pending.extend(producers)

    def skip(self, site: str, reason: str) -> None:
        self.report.skipped[reason] += 1
        logger.debug("%s left %s alone: %s", self.pass_id, site, reason)
