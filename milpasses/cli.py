"""The ``milpasses`` command line.

``milpasses convert [MODEL]`` converts a Hugging Face model (by default the bundled
all-MiniLM-L6-v2, offline) to an fp16 ML Program with ``ane_pipeline()`` and proves, by
simulating the converted program, that it computes what the PyTorch model computes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from milpasses.console import Console, HeldOutput, add_verbose_option


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2. With
    ``show_library_output`` a library failed on the model, and what it printed is shown too."""

    def __init__(self, message: str, show_library_output: bool = False):
        super().__init__(message)
        self.show_library_output = show_library_output


def _default_output(model: str | None) -> Path:
    from milpasses.convert import BUNDLED_NAME

    name = BUNDLED_NAME if model is None else Path(model.rstrip("/")).name.removesuffix(".onnx")
    return Path(f"{name}.mlpackage")


def convert_command(args) -> int:
    from milpasses.convert import ConversionError, LibraryFailure, Options, check_output, convert, save

    console = args.console
    output = Path(args.output) if args.output else _default_output(args.model)
    try:
        check_output(output, args.overwrite)
        options = Options.check(
            task=args.task, seq_len=args.seq_len, seq_lens=args.seq_lens, batch=args.batch, attention=args.attention,
            target=args.target, precision=args.precision, offline=args.offline,
            trust_remote_code=args.trust_remote_code, min_psnr_db=args.min_psnr, compress=args.compress,
            calibration=args.calibration, check_passes=args.check_passes, context=args.context,
            prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache, all_logits=args.all_logits,
            frontend=args.frontend)
        mlmodel, report = convert(args.model, options, progress=console)
        if args.strict and not report.passed:
            if not (args.quiet or args.json):
                print(report.table())
            console.error(f"verification failed: {report.failure()}; nothing written (--strict)")
            return 1
        written = save(mlmodel, report, output, args.overwrite)
    except LibraryFailure as error:
        raise UserError(str(error), show_library_output=True) from error
    except ConversionError as error:
        raise UserError(str(error)) from error
    except OSError as error:
        raise UserError(f"cannot write {output}: {error.strerror or error}") from error
    except Exception as error:  # outside the route's stages: still one line, the traceback with --verbose
        if args.verbose:
            raise
        raise _unexpected(f"convert failed on {args.model or 'the bundled model'}", error) from error
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report.table())
        print("\nwrote " + "\n      ".join(str(path) for path in written))
    if not report.passed:
        console.warning(f"verification failed: {report.failure()}; the package may not compute what the "
                        f"PyTorch model computes (see {written[2]})")
    return 0


def generate_command(args) -> int:
    from milpasses.generation.api import GenerationError, generate
    from milpasses.generation.host import ContextFullError

    try:
        generate(args.package, args.prompt, args.max_new_tokens, tokenizer=args.tokenizer, chat=args.chat,
                 top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
                 stream=lambda piece: print(piece, end="", flush=True), simulate=True if args.simulate else None)
    except (GenerationError, ContextFullError) as error:
        print()
        raise UserError(str(error)) from error
    except Exception as error:  # a library failing on this package: one line, the traceback with --verbose
        print()
        if args.verbose:
            raise
        raise _unexpected(f"generate failed on {args.package}", error) from error
    print()
    return 0


def _unexpected(what: str, error: Exception) -> UserError:
    """An error nobody foresaw, in one line that says how to see its traceback."""
    from milpasses.errors import first_line

    return UserError(f"{what}: {type(error).__name__}: {first_line(error)} (--verbose shows the traceback)",
                     show_library_output=True)


def _add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="generate text with a converted text-generation package")
    parser.add_argument("package", metavar="PACKAGE", help="an .mlpackage from convert --task text-generation")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--top-k", type=_positive_int, help="sample from the k most likely tokens (seeded)")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set holding this probability")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="model directory or hub id of the tokenizer (default: the package's "
                                            "source model)")
    parser.add_argument("--simulate", action="store_true", help="run in the MIL simulator also on macOS")
    parser.set_defaults(run=generate_command, quiet=False, json=False)
    add_verbose_option(parser)


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
    from milpasses.convert.options import (ATTENTION_MODES, DEFAULT_COMPRESSED_MIN_PSNR_DB, DEFAULT_MIN_PSNR_DB,
                                           FRONTENDS, KV_CACHE_MODES, PRECISIONS, TARGETS, TASKS)

    parser = argparse.ArgumentParser(prog="milpasses", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a Hugging Face model for the ANE and verify it")
    convert.add_argument("model", nargs="?", metavar="MODEL",
                         help="hub id, model directory, or ONNX model (a .onnx file or a directory holding model.onnx); "
                              "default: the bundled all-MiniLM-L6-v2, offline")
    convert.add_argument("--task", choices=tuple(TASKS), default="feature-extraction")
    lengths = convert.add_mutually_exclusive_group()
    lengths.add_argument("--seq-len", type=_positive_int, help="fixed sequence length (default 128)")
    lengths.add_argument("--seq-lens", type=_lengths, metavar="N,N,...",
                         help="enumerated sequence lengths, e.g. 64,128,512 (ct.EnumeratedShapes; an ONNX "
                              "model: a function per length, seq_len_64..., with --target iOS18)")
    convert.add_argument("--batch", type=_positive_int, help="batch size (default 1, or an ONNX graph's own)")
    convert.add_argument("--context", type=_positive_int,
                         help="text-generation: the KV cache's length; writes prefill and decode functions")
    convert.add_argument("--prefill-chunk", type=_positive_int, metavar="Q",
                         help="text-generation: tokens per prefill call (default 64, or the context if shorter)")
    convert.add_argument("--kv-cache", choices=KV_CACHE_MODES, default="io",
                         help="text-generation: the cache as inputs and outputs (io) or as Core ML state")
    convert.add_argument("--all-logits", action="store_true",
                         help="text-generation: prefill returns every token's logits (default: the last token's)")
    convert.add_argument("--attention", choices=ATTENTION_MODES, help="attention rewrite of ane_pipeline")
    convert.add_argument("--frontend", choices=FRONTENDS, default="trace",
                         help="how a PyTorch model reaches coremltools: torch.jit.trace (default) or torch.export")
    convert.add_argument("--target", choices=TARGETS,
                         help="minimum deployment target (default iOS16; text-generation needs iOS18)")
    convert.add_argument("--precision", choices=PRECISIONS, default="fp16")
    convert.add_argument("-o", "--output", help="OUT.mlpackage (default: MODEL's name .mlpackage)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output and reports")
    convert.add_argument("--offline", action="store_true", help="read local files only, never the network")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="run the model repository's own Python code (off unless given)")
    convert.add_argument("--min-psnr", type=float, default=None,
                         help=f"verification threshold in dB (default {DEFAULT_MIN_PSNR_DB:g}, or "
                              f"{DEFAULT_COMPRESSED_MIN_PSNR_DB:g} with --compress; auto's floor)")
    convert.add_argument("--compress", metavar="SCHEME",
                         help="palettize8, palettize6, palettize4 (data-aware), int8 (per channel) or auto "
                              "(bits per layer by simulation); per-block int schemes are refused")
    convert.add_argument("--calibration", metavar="FILE",
                         help="texts, one a line, calibrating --compress palettize4 (default: the samples)")
    convert.add_argument("--strict", action="store_true",
                         help="exit non-zero, writing nothing, when verification is below --min-psnr")
    convert.add_argument("--check-passes", action="store_true",
                         help="simulate the program before and after each ane:: pass and stop if one changes "
                              "what it computes (slower; one sequence length)")
    output = convert.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="print only errors")
    output.add_argument("--json", action="store_true", help="print only the report, as JSON")
    add_verbose_option(convert)
    convert.set_defaults(run=convert_command)
    from milpasses.analyze.cli import add_analyze_parser

    add_analyze_parser(commands)
    _add_generate_parser(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    quiet = getattr(args, "quiet", False)
    if args.verbose and quiet:
        parser.error("--verbose shows what the libraries print and --quiet hides everything but errors: choose one")
    args.console = Console(None if quiet or args.json else sys.stderr, errors=sys.stderr)
    if args.verbose:
        return _run(args, held=None)
    with HeldOutput() as held:
        try:
            return _run(args, held)
        except Exception:  # a failure of ours or of a library: what the libraries printed may explain it
            held.release()
            _show_held(args.console, held, "before it failed")
            raise


def _run(args, held: HeldOutput | None) -> int:
    try:
        return args.run(args)
    except UserError as error:
        args.console.error(str(error))
        if error.show_library_output and held is not None:
            _show_held(args.console, held, "before the error")
        return 2


def _show_held(console: Console, held: HeldOutput, when: str) -> None:
    """The last lines the libraries printed, held back until now (--verbose shows them as they come)."""
    lines = held.tail()
    if lines:
        print(f"milpasses: the last {len(lines)} lines coremltools, torch and transformers printed {when} "
              f"(--verbose shows them all as they come):", file=console.errors)
        print("\n".join(f"  {line}" for line in lines), file=console.errors, flush=True)


if __name__ == "__main__":
    sys.exit(main())
