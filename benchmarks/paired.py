"""Paired comparison of two service configurations: is B faster than A beyond the noise?

One run of ``convtune bench serve`` cannot resolve a change worth a millisecond on a shared
machine: its state moves more than that between rounds. This starts two services of the
same artifact at once, each with its own environment (``--a``/``--b NAME=VALUE``, e.g. a
``CONVTUNE_*`` setting), and drives them in turn with short loads, swapping the order in
every other pair, so that both sides see the same machine states. It reports each side's
medians, then the median of the per-pair differences in p50 latency and ratios of
requests/s, with how many pairs went B's way. Run as ``convtune bench paired`` or
``python -m benchmarks.paired``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convtune.benchmarks.common import write_report
from convtune.benchmarks.serve import (
    LoadPlan,
    add_upload_arguments,
    convtune_service,
    drive,
    uploads_for,
)


def compare(pairs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians of each side and of the per-pair B-vs-A differences, with their signs."""
    p50_diffs = [pair["b"]["p50_ms"] - pair["a"]["p50_ms"] for pair in pairs]
    rps_ratios = [pair["b"]["throughput_rps"] / pair["a"]["throughput_rps"] for pair in pairs]
    sides = {
        side: {
            key: statistics.median(pair[side][key] for pair in pairs)
            for key in ("throughput_rps", "p50_ms", "p95_ms")
        }
        for side in ("a", "b")
    }
    return {
        **sides,
        "p50_diff_ms": statistics.median(p50_diffs),
        "pairs_b_lower_p50": sum(diff < 0 for diff in p50_diffs),
        "rps_ratio": statistics.median(rps_ratios),
        "pairs_b_higher_rps": sum(ratio > 1 for ratio in rps_ratios),
        "pairs": len(pairs),
    }


def format_table(result: dict[str, Any], env: dict[str, dict[str, str]]) -> str:
    lines = [f"{'':<6}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}  environment"]
    for side in ("a", "b"):
        row = result[side]
        setting = " ".join(f"{k}={v}" for k, v in env[side].items()) or "(defaults)"
        lines.append(
            f"{side.upper():<6}{row['throughput_rps']:>9.1f}{row['p50_ms']:>9.2f}"
            f"{row['p95_ms']:>9.2f}  {setting}"
        )
    n = result["pairs"]
    lines.append(
        f"\nB - A p50: {result['p50_diff_ms']:+.2f} ms (B lower in "
        f"{result['pairs_b_lower_p50']} of {n} pairs); B / A req/s: {result['rps_ratio']:.3f} "
        f"(B higher in {result['pairs_b_higher_rps']} of {n})"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune bench paired",
        description="Compare two configurations of the service (environment variables) "
        "with alternating short loads on one machine.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="artifact directory or NAME[:VERSION] in the BentoML store"
    )
    for side in ("a", "b"):
        parser.add_argument(
            f"--{side}", action="append", default=[], metavar="NAME=VALUE",
            help=f"environment of service {side.upper()}; repeatable [none: the defaults]",
        )  # fmt: skip
    add_upload_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=8, help="clients [8]")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of loads [8]")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first [1]")
    parser.add_argument("--json", type=Path, help="write every pair and the medians here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from convtune.training.export import locate_artifact

    if args.concurrency < 1 or args.pairs < 1 or args.duration <= 0:
        raise ValueError("--concurrency, --pairs and --duration must be positive")
    env = {side: dict(item.split("=", 1) for item in getattr(args, side)) for side in ("a", "b")}
    if env["a"] == env["b"]:
        print(
            "note: A and B have the same environment (an A/A run shows the noise)", file=sys.stderr
        )
    artifact = locate_artifact(args.model)
    uploads = uploads_for(args)
    plan = LoadPlan((args.concurrency,), args.duration, args.warmup)
    pairs = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for side in ("a", "b"):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convtune-ab-")))
            servers[side] = stack.enter_context(convtune_service(artifact, workdir, env[side]))
        for number in range(args.pairs):
            order = ("a", "b") if number % 2 == 0 else ("b", "a")
            print(
                f"pair {number + 1}/{args.pairs}: {' then '.join(order).upper()}", file=sys.stderr
            )
            pair = {side: drive(servers[side], uploads, plan)[args.concurrency] for side in order}
            pairs.append(pair)
    result = compare(pairs)
    print(format_table(result, env))
    if args.json:
        write_report(args.json, "paired", vars(args), result, pairs)
    failed = sum(pair[side]["server_errors"] for pair in pairs for side in ("a", "b"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
