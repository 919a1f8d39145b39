"""The ``milpasses`` command line.

``milpasses convert`` converts the bundled all-MiniLM-L6-v2 to an fp16 ML Program with
``ane_pipeline()`` (linear layers as 1x1 convs, the body in (B, C, 1, S)) and proves,
by simulating the converted program, that it computes what the PyTorch model computes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from milpasses.analyze.cli import add_analyze_parser


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _trace_and_convert(model, inputs: dict[str, np.ndarray], precision: str):
    import coremltools as ct
    import torch

    from milpasses.pipeline import ane_pipeline
    from milpasses.tracing import LastHiddenState, convert_traced

    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    with torch.no_grad():
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), examples)
    return convert_traced(traced, inputs, precision, ane_pipeline(), compute_units=ct.ComputeUnit.CPU_AND_NE)


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that cannot or must not be written, before any slow work."""
    if output.suffix != ".mlpackage":
        raise UserError(f"the output must end in .mlpackage, got {output}")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise UserError(f"cannot write to {output.parent}: choose a writable directory with -o")


def _save_atomically(mlmodel, output: Path, overwrite: bool) -> None:
    """Write beside the destination, then rename: the destination is never half-written."""
    _check_output(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".milpasses-", dir=output.parent))
    try:
        mlmodel.save(str(staging / output.name))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_command(args) -> int:
    import torch

    from milpasses.bundled import SAMPLE_SENTENCES, load_bundled
    from milpasses.fp16_check import check_fp16
    from milpasses.passes import last_reports
    from milpasses.simulator import psnr, simulate

    output = Path(args.output)
    _check_output(output, args.overwrite)

    started = time.perf_counter()
    model, tokenizer = load_bundled()
    if args.seq_len > model.config.max_position_embeddings:
        raise UserError(
            f"--seq-len {args.seq_len} is above the model's maximum of {model.config.max_position_embeddings}"
        )
    batch = tokenizer(list(SAMPLE_SENTENCES), padding="max_length", max_length=args.seq_len,
                      truncation=True, return_tensors="np")
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    mlmodel = _trace_and_convert(model, inputs, args.precision)

    with torch.no_grad():
        tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}
        expected = model(**tensors).last_hidden_state.numpy()
    actual = simulate(mlmodel, inputs)["last_hidden_state"]
    quality = psnr(expected, actual)

    _save_atomically(mlmodel, output, args.overwrite)
    print(f"wrote {output} (all-MiniLM-L6-v2, {args.precision}, batch {len(SAMPLE_SENTENCES)}, "
          f"sequence {args.seq_len}) in {time.perf_counter() - started:.1f} s")
    print(f"simulated last_hidden_state against PyTorch fp32: PSNR {quality:.1f} dB "
          f"on {len(SAMPLE_SENTENCES)} real sentences, padded")
    findings = check_fp16(mlmodel, inputs)
    print(f"fp16 check: {len(findings)} finding(s)" + "".join(f"\n  {finding}" for finding in findings))
    for pass_id, report in last_reports().items():
        print(f"{pass_id}: {report.sites_rewritten} sites rewritten, {report.sites_skipped} left alone, "
              f"{report.ops_before} -> {report.ops_after} ops")
    if quality < args.min_psnr:
        print(f"warning: PSNR is below {args.min_psnr} dB", file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milpasses", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert the bundled all-MiniLM-L6-v2 and verify it")
    convert.add_argument("-o", "--output", default="all-MiniLM-L6-v2.mlpackage")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    convert.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    convert.add_argument("--seq-len", type=_positive_int, default=128)
    convert.add_argument("--min-psnr", type=float, default=60.0, help="verification threshold in dB")
    convert.set_defaults(run=convert_command)
    add_analyze_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except UserError as error:
        print(f"milpasses: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
