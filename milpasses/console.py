"""What the command line shows while it works.

milpasses prints its own lines only: one per stage with the seconds it took and, on a
terminal, a progress bar for a stage that runs longer than a few seconds. What the libraries
write to stderr as they are imported and as they convert (coremltools' notices and progress
bars, scikit-learn and torch version warnings, transformers' FutureWarning and TracerWarning)
is held back by :class:`HeldOutput`: shown with ``--verbose``, and with the error when
something fails.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, TextIO

#: A stage running longer than this gets a progress bar (on a terminal).
BAR_AFTER_SECONDS = 3.0


class Console:
    """milpasses' own lines. ``stages`` (None: none) receives the stage lines; ``errors`` the
    errors and warnings, which even ``--quiet`` shows."""

    def __init__(self, stages: TextIO | None, errors: TextIO | None = None,
                 bar_after: float = BAR_AFTER_SECONDS):
        self.stages = stages
        self.errors = errors if errors is not None else (stages or sys.stderr)
        self.bar_after = bar_after

    @contextmanager
    def stage(self, description: str, steps: int | None = None):
        """Time a stage; print ``milpasses: <description> ... <seconds> s`` when it is done.
        Yields a function to call after each of ``steps`` steps (the bar's progress; without
        ``steps`` the bar shows only the time so far)."""
        bar = None
        if self.stages is not None and _is_terminal(self.stages):
            bar = _DelayedBar(self.stages, description, steps, self.bar_after)
        started = time.perf_counter()
        try:
            yield bar.step if bar else _no_step
        finally:
            if bar:
                bar.close()
        if self.stages is not None:
            print(f"milpasses: {description} ... {time.perf_counter() - started:.1f} s", file=self.stages,
                  flush=True)

    def error(self, message: str) -> None:
        print(f"milpasses: error: {message}", file=self.errors, flush=True)

    def warning(self, message: str) -> None:
        print(f"milpasses: warning: {message}", file=self.errors, flush=True)


class Announcer(Console):
    """A console that hands each stage's description to a function as the stage starts."""

    def __init__(self, announce: Callable[[str], None]):
        super().__init__(None)
        self.announce = announce

    @contextmanager
    def stage(self, description: str, steps: int | None = None):
        self.announce(description)
        yield _no_step


def as_console(progress) -> Console:
    """A :class:`Console` for ``convert(progress=...)``: None (silent), a Console, or a function
    called with each stage's description."""
    if progress is None:
        return Console(None)
    return progress if isinstance(progress, Console) else Announcer(progress)


def _no_step() -> None:
    pass


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _DelayedBar:
    """A tqdm bar that appears once a stage has run ``after`` seconds, refreshed from a thread so
    the elapsed time moves while the stage computes; removed when the stage ends."""

    def __init__(self, stream, description: str, steps: int | None, after: float):
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream, description, steps, after), daemon=True)
        self._thread.start()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, stream, description, steps, after) -> None:
        if self._stop.wait(after):
            return
        from tqdm import tqdm

        layout = "{desc} {elapsed}" if steps is None else "{desc} {bar} {n_fmt}/{total_fmt} {elapsed}"
        with tqdm(total=steps, desc=f"milpasses: {description}", file=stream, leave=False,
                  bar_format=layout, dynamic_ncols=True) as bar:
            while not self._stop.wait(0.25):
                bar.n = self.done
                bar.refresh()


class HeldOutput:
    """Holds what is written to ``sys.stderr`` (warnings, log records without a handler of their
    own, progress bars) and what logging handlers would write to it, while the block runs."""

    def __init__(self):
        self.buffer = io.StringIO()
        self._stderr = None
        self._redirected: list[logging.StreamHandler] = []

    def __enter__(self) -> "HeldOutput":
        self._stderr = sys.stderr
        for handler in _stream_handlers():
            if handler.stream is self._stderr:
                handler.setStream(self.buffer)
                self._redirected.append(handler)
        sys.stderr = self.buffer
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._stderr is None:
            return
        sys.stderr = self._stderr
        for handler in self._redirected:
            handler.setStream(self._stderr)
        self._stderr, self._redirected = None, []

    def lines(self) -> list[str]:
        """The held text as the terminal would have shown it: a progress bar redrawn with
        carriage returns leaves only its last state."""
        shown = (line.rstrip("\r").rsplit("\r", 1)[-1] for line in self.buffer.getvalue().split("\n"))
        return [line for line in shown if line.strip()]

    def tail(self, count: int = 15) -> list[str]:
        return self.lines()[-count:]


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    return [h for logger in loggers for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def add_verbose_option(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show what coremltools, torch and transformers print (held back otherwise, "
                             "and shown when they fail)")
