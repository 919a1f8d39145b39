"""The ``milpasses`` command line.

``milpasses convert [MODEL]`` converts a Hugging Face model (by default the bundled
all-MiniLM-L6-v2, offline) to an fp16 ML Program with ``ane_pipeline()`` and proves, by
simulating the converted program, that it computes what the PyTorch model computes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _default_output(model: str | None) -> Path:
    from milpasses.convert import BUNDLED_NAME

    name = BUNDLED_NAME if model is None else Path(model.rstrip("/")).name
    return Path(f"{name}.mlpackage")


def convert_command(args) -> int:
    from milpasses.convert import ConversionError, check_output, convert, save

    output = Path(args.output) if args.output else _default_output(args.model)
    quiet = args.quiet or args.json
    try:
        check_output(output, args.overwrite)
        # coremltools and transformers draw progress bars and warnings on stderr: --quiet and
        # --json keep only our own errors there.
        silence = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
        with silence:
            mlmodel, report = convert(
                args.model, task=args.task, seq_len=args.seq_len, seq_lens=args.seq_lens, batch=args.batch,
                attention=args.attention, target=args.target, precision=args.precision, offline=args.offline,
                trust_remote_code=args.trust_remote_code, min_psnr_db=args.min_psnr,
                progress=None if quiet else _progress)
        if args.strict and not report.passed:
            if not quiet:
                print(report.table())
            print(f"milpasses: error: verification failed: {report.failure()}; nothing written (--strict)",
                  file=sys.stderr)
            return 1
        save(mlmodel, report, output, args.overwrite)
    except ConversionError as error:
        raise UserError(str(error)) from error
    except OSError as error:
        raise UserError(f"cannot write {output}: {error.strerror or error}") from error
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report.table())
        print(f"\nwrote {output}, report.json and report.md beside it")
    if not report.passed:
        print(f"milpasses: warning: verification failed: {report.failure()}; the package may not compute "
              f"what the PyTorch model computes (see report.md)", file=sys.stderr)
    return 0


def _progress(message: str) -> None:
    print(f"milpasses: {message} ...", file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _lengths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) < 2 or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"must be two or more distinct positive integers separated by commas (e.g. 64,128,512), got {text}")
    return sorted(values)


def build_parser() -> argparse.ArgumentParser:
    from milpasses.convert import ATTENTION_MODES, DEFAULT_MIN_PSNR_DB, PRECISIONS, TARGETS, TASKS

    parser = argparse.ArgumentParser(prog="milpasses", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a Hugging Face model for the ANE and verify it")
    convert.add_argument("model", nargs="?", metavar="MODEL",
                         help="hub id or model directory (default: the bundled all-MiniLM-L6-v2, offline)")
    convert.add_argument("--task", choices=tuple(TASKS), default="feature-extraction")
    lengths = convert.add_mutually_exclusive_group()
    lengths.add_argument("--seq-len", type=_positive_int, help="fixed sequence length (default 128)")
    lengths.add_argument("--seq-lens", type=_lengths, metavar="N,N,...",
                         help="enumerated sequence lengths, e.g. 64,128,512 (ct.EnumeratedShapes)")
    convert.add_argument("--batch", type=_positive_int, default=1)
    convert.add_argument("--attention", choices=ATTENTION_MODES, help="attention rewrite of ane_pipeline")
    convert.add_argument("--target", choices=TARGETS, default="iOS16", help="minimum deployment target")
    convert.add_argument("--precision", choices=PRECISIONS, default="fp16")
    convert.add_argument("-o", "--output", help="OUT.mlpackage (default: MODEL's name .mlpackage)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output and reports")
    convert.add_argument("--offline", action="store_true", help="read local files only, never the network")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="run the model repository's own Python code (off unless given)")
    convert.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR_DB,
                         help="verification threshold in dB (default %(default)s)")
    convert.add_argument("--strict", action="store_true",
                         help="exit non-zero, writing nothing, when verification is below --min-psnr")
    output = convert.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="print only errors")
    output.add_argument("--json", action="store_true", help="print only the report, as JSON")
    convert.set_defaults(run=convert_command)
    from milpasses.analyze.cli import add_analyze_parser

    add_analyze_parser(commands)
    return parser


def _quiet_libraries() -> None:
    """coremltools and transformers log notices as they are imported; --quiet and --json
    promise only errors (or the report), so they are told before anything imports them."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"--quiet", "--json"} & set(argv):
        _quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except UserError as error:
        print(f"milpasses: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
