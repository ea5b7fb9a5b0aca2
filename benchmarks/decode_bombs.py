"""Decode cost of hostile images, with and without the structural rules; the worst allowed.

``convtune bench decode-bombs [--rounds 3] [--json PATH]``

Each hostile file of :mod:`convtune.benchmarks.hostile_images` is decoded by
:func:`~convtune.data.images.decode_rgb` as the service does, once with the rules of
:mod:`convtune.data.image_rules` (what ships) and once with them switched off (the baseline:
what Pillow and libjpeg cost on their own). Then the costliest images the rules still let
through, at the pixel limit, give the bound per megapixel. Every decode runs in a fresh
process that reads the file from disk, so its CPU time and its peak memory growth are its
own; the table shows medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from convtune.benchmarks.common import machine, median_of, write_report
from convtune.benchmarks.hostile_images import HOSTILE_IMAGES, progressive_jpeg_with_many_scans


def _zeros_png(width: int = 6000, height: int = 6666) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def _photo_jpeg(width: int = 6000, height: int = 6666, *, progressive: bool) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(
        buffer, "JPEG", quality=90, progressive=progressive
    )
    return buffer.getvalue()


# The costliest shapes the rules allow, each at the pixel limit (40 Mpx; the JPEG of 64
# scans at 36 Mpx), next to ordinary photos of the same size.
ALLOWED_WORST: dict[str, Callable[[], bytes]] = {
    "png-zeros-40mpx": _zeros_png,
    "jpeg-64-scans-36mpx": lambda: progressive_jpeg_with_many_scans(64, 6000, 6000),
    "jpeg-baseline-40mpx": lambda: _photo_jpeg(progressive=False),
    "jpeg-progressive-40mpx": lambda: _photo_jpeg(progressive=True),
}


def decode_once(path: Path, *, rules: bool) -> dict:
    """Decode the file at ``path`` in this process: CPU s, wall s, peak RSS growth, outcome."""
    from convtune.data import images

    if not rules:
        images.structure_problem = lambda data: None  # the baseline: no structural rules
    data = path.read_bytes()
    before = _peak_rss_mb()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        outcome = "decoded {}x{}".format(*images.decode_rgb(data).shape[1::-1])
    except images.ImageDecodeError as error:
        outcome = f"refused: {error}"
    return {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "peak_rss_growth_mb": _peak_rss_mb() - before,
        "outcome": outcome,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, Linux), in MB. Not ``ru_maxrss``: that
    one carries the parent's peak across ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(path: Path, *, rules: bool) -> dict:
    """:func:`decode_once` in a fresh interpreter."""
    command = [sys.executable, "-m", "convtune.benchmarks.decode_bombs", "--one", str(path)]
    result = subprocess.run(
        [*command, *([] if rules else ["--no-rules"])],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(result.stdout)


def run_round(files: dict[str, Path]) -> dict:
    one_round = {}
    for name, path in files.items():
        one_round[name] = {"with_rules": measure(path, rules=True)}
        if name in HOSTILE_IMAGES:
            one_round[name]["without_rules"] = measure(path, rules=False)
    return one_round


def summarise(rounds: list[dict], name: str) -> dict:
    """Medians over ``rounds`` of each measurement of file ``name``."""
    keys = ("cpu_s", "wall_s", "peak_rss_growth_mb")
    return {
        mode: {key: median_of(rounds, name, mode, key) for key in keys} for mode in rounds[0][name]
    }


def format_table(files: dict[str, Path], median: dict, rounds: list) -> str:
    flags = " ".join(machine()["cpu_flags"]) or "unknown"
    lines = [
        f"decode_rgb, one fresh process per decode; medians of {len(rounds)}; CPU flags: {flags}",
        f"{'file':<24}{'bytes':>11}{'without rules':>22}{'with rules':>22}  outcome with rules",
    ]
    for name, path in files.items():
        cells = []
        for mode in ("without_rules", "with_rules"):
            if mode in median[name]:
                cpu, memory = median[name][mode]["cpu_s"], median[name][mode]["peak_rss_growth_mb"]
                cells.append(f"{cpu * 1000:>9,.0f} ms {memory:>6,.0f} MB")
            else:
                cells.append(f"{'(same)':>19}")
        outcome = rounds[-1][name]["with_rules"]["outcome"][:60]
        lines.append(f"{name:<24}{path.stat().st_size:>11,}{cells[0]:>22}{cells[1]:>22}  {outcome}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``convtune bench decode-bombs``: the table, and ``--json`` if asked."""
    with tempfile.TemporaryDirectory(prefix="convtune-bench-bombs-") as workdir:
        files = {}
        for name, make in {**HOSTILE_IMAGES, **ALLOWED_WORST}.items():
            files[name] = Path(workdir) / name
            files[name].write_bytes(make())
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
            rounds.append(run_round(files))
        median = {name: summarise(rounds, name) for name in files}
        print(format_table(files, median, rounds))
    if args.json:
        write_report(args.json, "decode-bombs", vars(args), median, rounds)
    return 0


def main(argv: list[str] | None = None) -> int:
    """One decode in this process (``--one PATH [--no-rules]``), as each measurement runs."""
    parser = argparse.ArgumentParser(description="one measured decode of the benchmark")
    parser.add_argument("--one", type=Path, required=True)
    parser.add_argument("--no-rules", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(decode_once(args.one, rules=not args.no_rules)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
