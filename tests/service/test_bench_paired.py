"""``convtune bench paired``: a smoke run with every part real (two services, one from a git
revision of this checkout, the stages timed by each side's code), and its refusals.

The smoke run checks that the comparison works end to end, not how fast anything is.
"""

from __future__ import annotations

import json
import shlex

from convtune.benchmarks import cli


def test_bench_paired_loads_both_sides_and_splits_each_request_cpu(exported, tmp_path) -> None:
    report_file = tmp_path / "paired.json"
    options = shlex.split(
        "--a-ref HEAD --b-env CONVTUNE_INFERENCE_LANES=0 --pairs 2 --duration 0.5 --warmup 0.2 "
        "--concurrency 1,2 --image-count 2 --image-size 64 --stage-seconds 0.05"
    )
    # Exits non-zero on any 5xx.
    table = exported.run(
        "-m", "convtune", "bench", "paired", str(exported.artifact_dir), *options,
        "--json", str(report_file), timeout=240,
    )  # fmt: skip
    report = json.loads(report_file.read_text())
    assert report["benchmark"] == "paired" and len(report["rounds"]) == 2
    assert "code at HEAD" in report["arguments"]["a_side"]
    assert "CONVTUNE_INFERENCE_LANES=0" in report["arguments"]["b_side"]
    # Each pair loaded both sides at each concurrency, B first in the second pair.
    assert [list(pair) for pair in report["rounds"]] == [["a", "b"], ["b", "a"]]
    loads = report["median"]["loads"]
    assert set(loads) == {"1", "2"}
    for row in loads.values():
        assert row["pairs"] == 2 and row["throughput_ratio"] > 0
        for side in ("a", "b"):
            assert row[side]["server_errors"] == 0 and row[side]["throughput_rps"] > 0
            cpu = row[side]["cpu_ms_per_request"]
            assert all(cpu[stage] > 0 for stage in ("client", "event_loop", "decode"))
            assert cpu["preprocess"] > 0 and cpu["model_one_thread"] > 0
    for stages in report["median"]["stages"].values():
        assert set(stages) == {"decode", "preprocess", "model_one_thread"}
    assert "B/A" in table and "event loop" in table and "inference" in table


def test_bench_paired_names_a_revision_git_does_not_know(exported, capsys) -> None:
    code = cli.main(["paired", str(exported.artifact_dir), "--a-ref", "no-such-revision"])
    assert code == 2
    message = capsys.readouterr().err
    assert message.startswith("convtune bench paired: error: cannot check out 'no-such-revision'")
