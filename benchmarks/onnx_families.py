"""The ONNX frontend on every fixture family: each is exported with ``torch.onnx.export``
(TorchScript exporter, opset 17, dynamic batch and sequence axes), converted by milpasses' ONNX
frontend with ``ane_pipeline()`` in fp16, and compared with the torch route of the same model.

    python benchmarks/onnx_families.py [--families bert,gpt2] [--opset 17] [--seq-lens 8,16]

Per family it prints the ONNX op types the export holds, the difference of the ane_pipeline()
op histograms (ONNX route minus torch route; "same" when none), whether attention became
einsums on both routes, and the PSNR of the simulated program against ONNX Runtime on the valid
tokens. Bar (issue 14): at least 12 of the 14 original families within a few ops and >= 60 dB.

With ``--seq-lens`` each family goes through ``convert(path, seq_lens=..., target="iOS18")``
instead (a function per length in one package): per length the PSNR against ONNX Runtime and
the function's histogram against the torch route at one length (iOS18), and whether every
function had the same sites rewritten. Families without a dynamic sequence axis (the vision
ones) are refused, as the command line refuses them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORIGINAL_FAMILIES = ["bert", "distilbert", "roberta", "xlm_roberta", "electra", "albert", "mpnet", "deberta_v2",
                     "gpt2", "llama", "qwen2", "t5_encoder", "vit", "clip_vision"]


def run_family(name: str, opset: int, directory: Path) -> dict:
    from fixtures.families import convert
    from milpasses.convert.coreml import histogram
    from milpasses.pipeline import ane_pipeline
    from tests.onnx_helpers import (convert_onnx_file, export_family, histogram_difference, onnx_ops,
                                    psnr_against_onnxruntime, within_allowed)

    path = directory / f"{name}.onnx"
    started = time.perf_counter()
    try:
        inputs = export_family(name, path, opset)
    except Exception as error:  # torch's exporter refuses some models (Mixtral's grouped matmul)
        return {"name": name, "ops": {}, "error": f"torch.onnx.export failed: {str(error).splitlines()[0][:200]}"}
    ops = onnx_ops(path)
    try:
        mlmodel = convert_onnx_file(path, inputs)
    except Exception as error:  # a failure of one family is a row of the table, not the end of the run
        return {"name": name, "ops": ops, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    torch_route = convert(name, "fp16", ane_pipeline())
    difference = histogram_difference(mlmodel, torch_route)
    return {"name": name, "ops": ops, "difference": difference, "within": within_allowed(difference),
            "einsums": (histogram(mlmodel._mil_program).get("einsum", 0),
                        histogram(torch_route._mil_program).get("einsum", 0)),
            "psnr": psnr_against_onnxruntime(mlmodel, path, inputs), "seconds": time.perf_counter() - started}


def run_family_lengths(name: str, lengths: list[int], directory: Path) -> dict:
    import coremltools as ct

    from fixtures.families import convert as torch_convert
    from milpasses.convert import ConversionError, convert
    from milpasses.convert.coreml import histogram
    from milpasses.pipeline import ane_pipeline
    from tests.onnx_helpers import export_family, onnx_ops, within_allowed

    path = directory / f"{name}.onnx"
    started = time.perf_counter()
    inputs = export_family(name, path)
    ops = onnx_ops(path)
    try:
        _, report = convert(str(path), seq_lens=lengths, batch=len(next(iter(inputs.values()))), target="iOS18")
    except ConversionError as error:
        return {"name": name, "ops": ops, "error": str(error).split(";")[0]}
    torch_ops = histogram(torch_convert(name, "fp16", ane_pipeline(), target=ct.target.iOS18)._mil_program)
    differences = {}
    for function in report.functions.values():
        mine = function["ops"]
        differences[function["seq_len"]] = {op: mine.get(op, 0) - torch_ops.get(op, 0)
                                            for op in sorted(set(mine) | set(torch_ops))
                                            if mine.get(op, 0) != torch_ops.get(op, 0)}
    sites = [f["sites_rewritten"] for f in report.functions.values()]
    return {"name": name, "ops": ops, "psnr": {e["seq_len"]: e["psnr_db"] for e in report.psnr},
            "differences": differences, "within": all(within_allowed(d) for d in differences.values()),
            "same_sites": all(s == sites[0] for s in sites), "seconds": time.perf_counter() - started}


def _print_lengths_row(row: dict) -> bool:
    if "error" in row:
        print(f"{row['name']:<12} refused  {row['error']}", flush=True)
        return False
    ok = row["within"] and row["same_sites"] and min(row["psnr"].values()) >= 60
    psnr = ", ".join(f"{n}: {db:.1f}" for n, db in row["psnr"].items())
    difference = "; ".join(f"{n}: " + (", ".join(f"{op} {d:+d}" for op, d in diff.items()) or "same")
                           for n, diff in row["differences"].items())
    print(f"{row['name']:<12} {'ok' if ok else 'FAILED':<7} PSNR vs ORT per length {psnr} dB  histogram vs torch "
          f"{difference}  sites rewritten {'alike at every length' if row['same_sites'] else 'DIFFER'}  "
          f"({row['seconds']:.1f} s)", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(ORIGINAL_FAMILIES))
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--seq-lens", help="convert each family at these lengths, a function per length (8,16)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    passed = 0
    with tempfile.TemporaryDirectory() as directory:
        for name in args.families.split(","):
            if args.seq_lens:
                passed += _print_lengths_row(run_family_lengths(name, [int(n) for n in args.seq_lens.split(",")],
                                                                Path(directory)))
                continue
            row = run_family(name, args.opset, Path(directory))
            ops = ", ".join(f"{op} {n}" for op, n in sorted(row["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
            if "error" in row:
                print(f"{name:<12} FAILED  {row['error']}\n             ONNX ops: {ops}", flush=True)
                continue
            ok = row["within"] and row["psnr"] >= 60
            passed += ok
            difference = ", ".join(f"{op} {n:+d}" for op, n in row["difference"].items()) or "same"
            print(f"{name:<12} {'ok' if ok else 'FAILED':<7} PSNR vs ORT {row['psnr']:6.1f} dB  einsums onnx/torch "
                  f"{row['einsums'][0]}/{row['einsums'][1]}  histogram vs torch: {difference}  "
                  f"({row['seconds']:.1f} s)\n             ONNX ops: {ops}", flush=True)
    print(f"\n{passed} of {len(args.families.split(','))} families within the allowed histogram difference and >= 60 dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
