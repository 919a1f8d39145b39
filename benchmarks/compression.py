"""Compression on the bundled all-MiniLM-L6-v2: package size, PSNR per output and the worst
sentence-embedding cosine against PyTorch fp32, per scheme, on the real sample sentences.

    python benchmarks/compression.py [--seq-len 64] [--schemes fp16,palettize8,...]

Schemes: fp16 (none), palettize8, palettize6, plain4 (ct.optimize.coreml's k-means at 4 bits,
uncalibrated, 4 bits everywhere: the comparison for the data-aware scheme), skm4 (sensitive
k-means, calibrated, 4 bits everywhere), palettize4 (sensitive k-means, calibrated, with the
layers measured most sensitive widened to 6 or 8 bits, 5 bits on average), int8, auto (bits
per layer at --min-psnr, default 40 dB).
Bars (issue 13): palettize8 >= 55 dB on last_hidden_state; palettize6 cosine >= 0.995;
palettize4 >= plain4 + 5 dB with weights <= 40% of fp16; auto >= 40 dB with fewer bytes than
palettize6. Each scheme is a full ``convert()``; auto takes minutes (it simulates each layer).
First, the analyze estimate of stock DistilBERT-base on A15, fp16 and 4-bit (bar: 4-bit below).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

SCHEMES = ("fp16", "palettize8", "palettize6", "plain4", "skm4", "palettize4", "int8", "auto")


def distilbert_estimates(seq_len: int = 128) -> dict[str, float]:
    """``milpasses analyze``'s A15 latency of stock DistilBERT-base (seeded weights) after
    ``ane_pipeline()``: fp16, and with 4-bit palettized weights (embedding table at 6 bits)."""
    import coremltools as ct

    from fixtures import families as F
    from milpasses import ane_pipeline
    from milpasses.analyze import analyze
    from milpasses.convert import compress as compressing

    _, inputs, traced = F.distilbert_base(seq_len)
    mlmodel = F.convert_traced(traced, inputs, "fp16", ane_pipeline(), ct.target.iOS18)
    sites = compressing.weight_sites(mlmodel._mil_program)
    palettized = compressing.palettized(mlmodel, compressing.uniform_bits(sites, 4))
    return {name: analyze(model._mil_program, "A15").latency * 1e3
            for name, model in (("fp16", mlmodel), ("4-bit", palettized))}


def _plain4(seq_len: int, min_psnr_db: float):
    """palettize4's bit allocation through ct.optimize.coreml's uncalibrated k-means, verified like convert()."""
    from unittest import mock

    from milpasses.convert import compress as compressing
    from milpasses.convert import convert

    def plain(mlmodel, scheme, compression, *rest):
        sites = compressing.weight_sites(mlmodel._mil_program)
        from milpasses.weights import dense_bytes, stored_bytes

        compression.weight_bytes_before = dense_bytes(mlmodel._mil_program.functions["main"])
        compression.bits = compressing.uniform_bits(sites, 4)
        mlmodel = compressing.palettized(mlmodel, compression.bits)
        compression.weight_bytes_after = stored_bytes(mlmodel._mil_program.functions["main"])
        return mlmodel

    with mock.patch.object(compressing, "compress", plain):
        return convert(None, seq_len=seq_len, target="iOS18", compress="palettize8", min_psnr_db=min_psnr_db)


def run(scheme: str, seq_len: int, min_psnr_db: float):
    from milpasses.convert import convert, save

    started = time.perf_counter()
    if scheme == "plain4":
        mlmodel, report = _plain4(seq_len, min_psnr_db)
    elif scheme == "skm4":
        from unittest import mock

        from milpasses.convert import compress as compressing

        with mock.patch.object(compressing, "PALETTIZE4_MEAN_BITS", 4.0):
            mlmodel, report = convert(None, seq_len=seq_len, target="iOS18", min_psnr_db=min_psnr_db,
                                      compress="palettize4")
    else:
        mlmodel, report = convert(None, seq_len=seq_len, target="iOS18", min_psnr_db=min_psnr_db,
                                  compress=None if scheme == "fp16" else scheme)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as directory:
        save(mlmodel, report, Path(directory) / "model.mlpackage")
    return report, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--min-psnr", type=float, default=40.0)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--skip-analyze", action="store_true", help="leave out the DistilBERT-base estimates")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.skip_analyze:
        estimates = distilbert_estimates()
        print("DistilBERT-base, A15, S=128, analyze estimate: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in estimates.items())
              + f"  (bar: 4-bit below fp16: {'met' if estimates['4-bit'] < estimates['fp16'] else 'MISSED'})",
              flush=True)
    rows, fp16_bytes = [], None
    for scheme in args.schemes.split(","):
        report, seconds = run(scheme, args.seq_len, args.min_psnr)
        fp16_bytes = fp16_bytes or (report.package_bytes if scheme == "fp16" else None)
        psnr = {e["output"]: e["psnr_db"] for e in report.psnr}
        cosine = min((e["worst_cosine"] for e in report.cosine), default=float("nan"))
        rows.append((scheme, report.package_bytes, psnr, cosine, seconds, report.compression))
        print(f"{scheme:<11} package {report.package_bytes / 2**20:6.1f} MiB  "
              + "  ".join(f"{k} {v:5.1f} dB" for k, v in psnr.items()) + f"  cosine {cosine:.5f}  ({seconds:.0f} s)",
              flush=True)
        if scheme == "palettize4":
            print("  palettize4 bits:", dict(sorted(Counter(report.compression["bits"].values()).items())),
                  {name: n for name, n in report.compression["bits"].items() if n != 4})
        if scheme == "auto":
            bits = Counter((p["role"], p["bits"]) for p in report.compression["plan"])
            print("  auto bits:", dict(sorted(bits.items())))
            for layer in report.compression["plan"]:
                print(f"    {layer['op']:<45} {layer['role']:<9} {layer['bits']} bits  alone: {layer['psnr_db_alone']}")
    print("\n| scheme | package vs fp16 | " + " | ".join(rows[0][2]) + " | worst cosine |")
    print("|---|---|" + "---|" * len(rows[0][2]) + "---|")
    for scheme, size, psnr, cosine, _, _ in rows:
        ratio = f"{size / fp16_bytes:.2f}" if fp16_bytes else f"{size / 2**20:.1f} MiB"
        print(f"| {scheme} | {ratio} | " + " | ".join(f"{v:.1f} dB" for v in psnr.values()) + f" | {cosine:.5f} |")


if __name__ == "__main__":
    main()
