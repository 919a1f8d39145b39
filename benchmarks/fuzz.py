"""The fuzzer's long run: transformer variants drawn by hypothesis (fixtures/fuzz.py), each
converted in every attention mode with ``ane_pipeline(check=True)`` and held to the property of
tests/test_fuzz.py (equal to torch in fp32, fp16 at 60 dB or within 1 dB of DEFAULT, every
attention site rewritten or left alone with a reason, device limits, each pass checked).

    nice -n 19 python benchmarks/fuzz.py --examples N [--seed S] [--modes split_einsum,batched] [--minutes M]
    nice -n 19 python benchmarks/fuzz.py --log run.jsonl [--resume] --examples N [--minutes M]
    python benchmarks/fuzz.py --log run.jsonl --summary

Prints each model it tried and what each mode did, then a summary: models, models per minute,
the sites each mode rewrote and left alone, the reasons, every kind of failure. A failing model
is shrunk (each field put back to its default while the failure stays the same) and printed as a
ready-to-paste test. Unlike the CI test, the run goes on after a failure, so one run finds every
kind.

With ``--log`` every model drawn is appended to a JSON-lines file as soon as it is checked (its
index, session and seed, the case, each mode's outcome or the failure), and the summary is the
whole log's. ``--resume`` continues a log across sessions: ``--examples N`` then means "until
the log holds N models", each session draws with a seed of its own, and a model already in the
log is skipped, so none is counted twice. A log is never overwritten: without ``--resume`` an
existing one is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
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


def describe(case: Case) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(case).items() if v != getattr(Case, k)) or "defaults"


def _commit() -> str | None:
    """The commit the run's code is at, so a log spanning sessions says what each one checked."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def _key(case_fields: dict) -> str:
    """A model's identity in the log: every field of its case."""
    return json.dumps(case_fields, sort_keys=True)


def _finite_or_none(value):
    """JSON has no infinity: an exact fp16 output (infinite PSNR) is written as null."""
    return None if value is None or math.isinf(value) else round(value, 3)


def _outcome_record(outcome) -> dict:
    return {"rewritten": outcome.rewritten, "left_alone": outcome.skipped,
            "fp32_relative_error": float(f"{outcome.fp32_relative_error:.3g}"),
            "fp16_psnr_db": _finite_or_none(outcome.fp16_psnr_db),
            "default_psnr_db": _finite_or_none(outcome.default_psnr_db)}


def read_log(path: Path) -> list[dict]:
    """The models a log holds. A last line cut short (the run was killed while writing it) is
    cut off the file, so the next session appends after a whole line."""
    if not path.exists():
        return []
    text = path.read_text()
    records, kept = [], 0
    for line in text.splitlines(keepends=True):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if text[kept + len(line):].strip():
                raise ValueError(f"{path} is not a fuzz log: line {len(records) + 1} is not JSON") from None
            with path.open("r+") as log:
                log.truncate(kept)
            break
        kept += len(line)
    return records


def summary(records: list[dict]) -> str:
    """The whole log: models and sessions, models per minute, per mode the conversions and the
    sites rewritten and left alone, the reasons, and the failures by kind."""
    if not records:
        return "the log holds no model yet"
    seconds = sum(r["seconds"] for r in records)
    sessions = len({r["session"] for r in records})
    commits = ", ".join(dict.fromkeys(str(r.get("commit")) for r in records))
    conversions, rewritten, left_alone, reasons = Counter(), Counter(), Counter(), Counter()
    failures: dict[str, list[dict]] = {}
    for record in records:
        if "failure" in record:
            failures.setdefault(record["failure"]["signature"], []).append(record)
        for mode, outcome in record.get("outcomes", {}).items():
            conversions[mode] += 1
            rewritten[mode] += outcome["rewritten"]
            left_alone[mode] += sum(outcome["left_alone"].values())
            for reason, count in outcome["left_alone"].items():
                reasons[reason.split(" (at ")[0]] += count  # the site's op name apart
    failed = sum(len(f) for f in failures.values())
    lines = [f"{len(records)} models in {sessions} session(s) (code at {commits}), {seconds / 60:.1f} minutes of checking: "
             f"{len(records) / (seconds / 60):.1f} models/minute; {len(records) - failed} passed, {failed} failed"]
    for mode in sorted(conversions, key=lambda m: MODES.index(m) if m in MODES else len(MODES)):
        lines.append(f"  {mode:<16} {conversions[mode]} models passed, attention sites rewritten {rewritten[mode]}, "
                     f"left alone {left_alone[mode]}")
    lines += [f"  left alone x{count}: {reason}" for reason, count in reasons.most_common()]
    for signature, found in failures.items():
        first = found[0]
        lines.append(f"  FAILED x{len(found)}: {signature}\n    first at model {first['index']} "
                     f"({first['failure']['mode']}): {describe(Case(**first['case']))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100,
                        help="models to draw (each in every mode); with --resume, the number the log should hold")
    parser.add_argument("--seed", type=int, default=0, help="the first session's seed (later sessions take the next)")
    parser.add_argument("--modes", default=",".join(MODES), help="attention modes, comma-separated")
    parser.add_argument("--no-shrink", action="store_true", help="print failing cases as drawn")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop drawing after this long (the examples not run are not counted)")
    parser.add_argument("--log", type=Path, default=None, help="append each model to this JSON-lines file")
    parser.add_argument("--resume", action="store_true", help="continue the run --log holds")
    parser.add_argument("--summary", action="store_true", help="print the summary of --log and stop")
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown attention mode(s) {unknown}; the modes are {', '.join(MODES)}")
    if (args.resume or args.summary) and args.log is None:
        parser.error("--resume and --summary read a log: give it with --log FILE")
    try:
        records = read_log(args.log) if args.log is not None else []
    except ValueError as error:
        parser.error(str(error))
    if args.summary:
        print(summary(records))
        return 0
    if records and not args.resume:
        parser.error(f"{args.log} already holds {len(records)} models: pass --resume to continue it, "
                     f"or give another --log")
    session = 1 + max((r["session"] for r in records), default=0)
    session_seed = 1 + max((r["seed"] for r in records), default=args.seed - 1)
    seen = {_key(r["case"]) for r in records}
    wanted = args.examples - len(records) if args.resume else args.examples
    torch.set_num_threads(1)  # tiny tensors: threads only contend

    tried, new_records, commit = [0], [], _commit()
    failures: dict[str, tuple[Case, BaseException]] = {}
    started = time.perf_counter()
    log = args.log.open("a") if args.log is not None else None

    # Hypothesis draws more than it is asked for when some draws repeat a model, and a session
    # stops once it has checked ``wanted`` new ones.
    @seed(session_seed)
    @settings(max_examples=max(wanted, 1) * 2, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case):
        key = _key(asdict(case))
        if tried[0] >= wanted or key in seen or (
                args.minutes is not None and time.perf_counter() - started > 60 * args.minutes):
            return
        seen.add(key)
        tried[0] += 1
        index = len(records) + tried[0]
        print(f"[{index}] {describe(case)}", flush=True)
        record = {"index": index, "session": session, "seed": session_seed, "commit": commit, "case": asdict(case)}
        model_started = time.perf_counter()
        try:
            outcomes = check_case(case, modes=modes)
        except Exception as error:  # noqa: BLE001 (recorded; the run goes on)
            signature = _signature(error)
            mode = next((n.removeprefix("attention mode: ") for n in getattr(error, "__notes__", ())
                         if n.startswith("attention mode: ")), None)
            print(f"    FAILED {signature}", flush=True)
            failures.setdefault(signature, (case, error))
            record["failure"] = {"mode": mode, "signature": signature, "message": str(error)[:2000]}
        else:
            record["outcomes"] = {outcome.mode: _outcome_record(outcome) for outcome in outcomes}
            for outcome in outcomes:
                print(f"    {outcome.mode:<16} rewritten {outcome.rewritten}, left alone {dict(outcome.skipped) or '-'}; "
                      f"fp32 rel {outcome.fp32_relative_error:.1e}, fp16 {outcome.fp16_psnr_db:.1f} dB", flush=True)
        record["seconds"] = round(time.perf_counter() - model_started, 2)
        new_records.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    try:
        if wanted > 0:
            run()
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - started
    print(f"\nthis session (seed {session_seed}): {tried[0]} models x {len(modes)} modes in {seconds:.0f} s, "
          f"{tried[0] / (seconds / 60):.1f} models/minute; {len(failures)} kind(s) of failure")
    print(("the whole log: " if records else "") + summary(records + new_records))
    for signature, (case, error) in failures.items():
        print(f"\nFAILURE {signature}")
        print("".join(traceback.format_exception_only(type(error), error)).strip())
        if not args.no_shrink:
            case = shrink(case, modes, signature)
        print("A ready-to-paste test (tests/test_fuzz.py imports Case and check_case):\n")
        print(as_test(case, modes))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
