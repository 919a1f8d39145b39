"""``milpasses.console``: stage lines, the progress bar of a long stage, and held library output."""

import io
import logging
import sys
import time

from milpasses.console import Console, HeldOutput


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_stage_prints_one_line_with_its_seconds_and_no_bar_off_a_terminal():
    stream = io.StringIO()
    with Console(stream, bar_after=0.0).stage("tracing") as step:
        time.sleep(0.3)
        step()
    assert stream.getvalue().startswith("milpasses: tracing ... 0.")
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().endswith(" s\n")


def test_a_long_stage_on_a_terminal_draws_a_bar_that_moves_then_goes():
    terminal = Terminal()
    with Console(terminal, bar_after=0.05).stage("verifying", steps=2) as step:
        time.sleep(0.4)
        step()
        time.sleep(0.4)
        step()
        time.sleep(0.4)
    drawn = terminal.getvalue()
    assert "milpasses: verifying" in drawn and "1/2" in drawn and "2/2" in drawn
    assert drawn.splitlines()[-1].startswith("milpasses: verifying ... 1.")


def test_a_short_stage_on_a_terminal_draws_no_bar():
    terminal = Terminal()
    with Console(terminal, bar_after=5.0).stage("loading the model"):
        pass
    assert terminal.getvalue().startswith("milpasses: loading the model ... 0.0 s")
    assert "|" not in terminal.getvalue()


def test_a_silent_console_prints_nothing_but_errors():
    errors = io.StringIO()
    console = Console(None, errors=errors)
    with console.stage("tracing"):
        pass
    console.error("bad input")
    assert errors.getvalue() == "milpasses: error: bad input\n"


def test_held_output_keeps_stderr_and_stderr_handlers_until_released():
    logger = logging.getLogger("milpasses-test-library")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        before = sys.stderr
        with HeldOutput() as held:
            print("notice from an import", file=sys.stderr)
            logger.warning("a handler's record")
            sys.stderr.write("\rbar 10%\rbar 100%\n")
        assert sys.stderr is before and handler.stream is before
    finally:
        logger.removeHandler(handler)
    assert held.lines() == ["notice from an import", "a handler's record", "bar 100%"]
    assert held.tail(2) == ["a handler's record", "bar 100%"]
