"""Saving: the package and its two reports, named after it (``out/Model.mlpackage`` beside
``out/Model.report.json`` and ``out/Model.report.md``). An existing package or report is kept
unless overwriting is asked for; each file is written in a staging directory beside the
destination and then renamed, so none is ever half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from milpasses.errors import ConversionError
from milpasses.convert.report import ConversionReport


def report_paths(output: Path) -> tuple[Path, Path]:
    """The JSON and Markdown reports of the package at ``output``."""
    output = Path(output)
    stem = output.name.removesuffix(".mlpackage")
    return output.parent / f"{stem}.report.json", output.parent / f"{stem}.report.md"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that cannot or must not be written, before any slow work."""
    output = Path(output)
    if output.suffix != ".mlpackage":
        raise ConversionError(f"the output must end in .mlpackage, got {output}")
    if not overwrite:
        taken = [p for p in (output, *report_paths(output)) if p.exists()]
        if taken:
            raise ConversionError(f"{' and '.join(str(p) for p in taken)} already "
                                  f"{'exists' if len(taken) == 1 else 'exist'}; pass --overwrite to replace")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise ConversionError(f"cannot write to {output.parent}: choose a writable directory with -o")


def save(mlmodel, report: ConversionReport, output, overwrite: bool = False) -> list[Path]:
    """Write the package and its reports; returns the three paths written."""
    output = Path(output)
    check_output(output, overwrite)
    json_path, markdown_path = report_paths(output)
    staging = Path(tempfile.mkdtemp(prefix=".milpasses-", dir=output.parent))
    try:
        package = staging / output.name
        mlmodel.save(str(package))
        report.package_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        (staging / json_path.name).write_text(report.to_json() + "\n")
        (staging / markdown_path.name).write_text(report.to_markdown())
        if output.exists():
            shutil.rmtree(output)
        os.replace(package, output)
        os.replace(staging / json_path.name, json_path)
        os.replace(staging / markdown_path.name, markdown_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output, json_path, markdown_path]
