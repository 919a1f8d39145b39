"""What every kind of model on the route provides (:class:`Source`), and the stage runner
(:class:`Stages`) that times each stage and names it in any failure."""

from __future__ import annotations

import time
from contextlib import contextmanager

from milpasses.console import Console
from milpasses.convert.coreml import Converted
from milpasses.convert.report import ConversionReport
from milpasses.errors import ConversionError, LibraryFailure, first_line
from milpasses.frontend.function import Function


class Stages:
    """Runs the stages: shows each on the console, records its seconds, and names it in any failure."""

    def __init__(self, console: Console, model_class: str = "the model"):
        self.console, self.seconds, self.model_class = console, {}, model_class

    @contextmanager
    def stage(self, key: str, description: str, steps: int | None = None):
        started = time.perf_counter()
        with self.guard(key), self.console.stage(description, steps) as step:
            yield step
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

    @contextmanager
    def guard(self, key: str):
        """Any failure but a ConversionError becomes one, naming the stage and the model."""
        try:
            yield
        except ConversionError:
            raise
        except Exception as error:  # a library's or our own failure: one line, never a traceback
            raise LibraryFailure(f"{key} failed on {self.model_class}: {type(error).__name__}: "
                                 f"{first_line(error)}") from error


class Source:
    """A kind of model on the route. Subclasses fill in each stage."""

    description = ""  # how the report names the model
    model_class = "the model"  # named in errors
    task = ""  # how the report names what the package computes
    frontend = "torch.jit.trace"  # what reads the model for coremltools
    default_function: str | None = None  # of a multifunction package; None: the first

    def load(self) -> None:
        raise NotImplementedError

    def functions(self, stages: Stages) -> list[Function]:
        """What ``ct.convert`` reads, one per function of the package (the frontend's work)."""
        raise NotImplementedError

    def compress(self, converted: list[Converted], stages: Stages) -> list[Converted]:
        return converted

    def report(self, converted: list[Converted]) -> ConversionReport:
        raise NotImplementedError

    def baseline(self) -> Function | None:
        """The function converted with DEFAULT for the report's op comparison; None for none."""
        return None

    def verifying(self, mlmodel) -> tuple[str, int | None]:
        """What verification does, as the console shows it, and its steps (None: unknown)."""
        raise NotImplementedError

    def verify(self, mlmodel, converted: list[Converted], report: ConversionReport, step) -> None:
        """Fill the report's verification; ``step`` is called after each of the steps."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        return {}
