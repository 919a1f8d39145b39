"""The fuzzer's long run: transformer variants drawn by hypothesis (fixtures/fuzz.py), each
converted in every attention mode with ``ane_pipeline(check=True)`` and held to the property of
tests/test_fuzz.py (equal to torch in fp32, fp16 at 60 dB or within 1 dB of DEFAULT, every
attention site rewritten or left alone with a reason, device limits, each pass checked).

    nice python benchmarks/fuzz.py --examples N [--seed S] [--modes split_einsum,batched] [--minutes M]

Prints each case it tried and what each mode did, then the counts per mode and the reasons sites
were left alone. A failing case is shrunk (each field put back to its default while the failure
stays the same) and printed as a ready-to-paste test. Unlike the CI test, the run goes on after
a failure, so that one run finds every kind.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from fixtures.fuzz import MODES, Case, as_test, cases, check_case  # noqa: E402


def _signature(error: BaseException) -> str:
    """What kind of failure: its type and message without numbers."""
    return f"{type(error).__name__}: " + re.sub(r"\d[\d.e+-]*", "#", str(error).splitlines()[0] if str(error) else "")[:90]


def _failure(case: Case, modes) -> BaseException | None:
    try:
        check_case(case, modes=modes)
    except Exception as error:  # noqa: BLE001 (any failure is a finding)
        return error
    return None


def shrink(case: Case, modes, signature: str) -> Case:
    """Each field back to its default, one at a time, while the failure keeps its signature."""
    changed = True
    while changed:
        changed = False
        for name in (f.name for f in fields(Case)):
            default = getattr(Case, name)
            if getattr(case, name) == default:
                continue
            smaller = replace(case, **{name: default})
            error = _failure(smaller, modes)
            if error is not None and _signature(error) == signature:
                case, changed = smaller, True
    return case


def _summary(case: Case) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(case).items() if v != getattr(Case, k)) or "defaults"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="drawn models (each in every mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help="attention modes, comma-separated")
    parser.add_argument("--no-shrink", action="store_true", help="print failing cases as drawn")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop drawing after this long (the examples not run are not counted)")
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    torch.set_num_threads(1)  # tiny tensors: threads only contend

    tried, rewritten, left_alone, reasons = [0], Counter(), Counter(), Counter()
    failures: dict[str, tuple[Case, BaseException]] = {}
    started = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case):
        if args.minutes is not None and time.perf_counter() - started > 60 * args.minutes:
            return
        tried[0] += 1
        print(f"[{tried[0]}] {_summary(case)}", flush=True)
        try:
            outcomes = check_case(case, modes=modes)
        except Exception as error:  # noqa: BLE001 (recorded; the run goes on)
            signature = _signature(error)
            print(f"    FAILED {signature}", flush=True)
            failures.setdefault(signature, (case, error))
            return
        for outcome in outcomes:
            rewritten[outcome.mode] += outcome.rewritten
            left_alone[outcome.mode] += sum(outcome.skipped.values())
            reasons.update(outcome.skipped)
            print(f"    {outcome.mode:<16} rewritten {outcome.rewritten}, left alone {dict(outcome.skipped) or '-'}; "
                  f"fp32 rel {outcome.fp32_relative_error:.1e}, fp16 {outcome.fp16_psnr_db:.1f} dB", flush=True)

    run()
    seconds = time.perf_counter() - started
    print(f"\n{tried[0]} models x {len(modes)} modes = {tried[0] * len(modes)} conversions in {seconds:.0f} s; "
          f"{len(failures)} kind(s) of failure")
    for mode in modes:
        print(f"  {mode:<16} attention sites rewritten {rewritten[mode]}, left alone {left_alone[mode]}")
    for reason, count in reasons.most_common():
        print(f"  left alone x{count}: {reason}")
    for signature, (case, error) in failures.items():
        print(f"\nFAILURE {signature}")
        print("".join(traceback.format_exception_only(type(error), error)).strip())
        if not args.no_shrink:
            case = shrink(case, modes, signature)
        print("A ready-to-paste test (tests/test_fuzz.py imports Case and check_case):\n")
        print(as_test(case))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
