"""``convtune bench serve``: a smoke run with tiny inputs, one short round, every part real;
the one-line answer when the dev extra it needs is missing; and the BentoML peer's answers
against the artifact's own.

The smoke run checks that the benchmark works end to end (ceiling, service, both peers,
table, JSON), not how fast anything is: benchmarks are not timed tests (docs/benchmarks.md
has the figures).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import reference_results
from PIL import Image

from convtune.benchmarks import cli
from convtune.benchmarks.bentoml_peer import ImageClassifier
from convtune.models.inference import OnnxClassifier

ABSENT = "convtune-test-absent-distribution"  # installed nowhere


def test_bench_serve_without_its_extra_names_the_missing_package_and_the_install(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setattr(cli, "NAIVE_PEER_NEEDS", ("fastapi", ABSENT))
    assert cli.main(["serve", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (
        f"convtune bench serve needs {ABSENT} from the dev extra: pip install -e '.[dev]'"
    )


@pytest.mark.parametrize("peers", [["--no-peer"], ["--peers", "bentoml"], ["--peers", "none"]])
def test_bench_serve_without_the_naive_peer_does_not_need_its_packages(
    peers, monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setattr(cli, "NAIVE_PEER_NEEDS", (ABSENT,))
    assert cli.main(["serve", str(tmp_path), *peers]) == 2
    message = capsys.readouterr().err
    # Past the check: the benchmark itself ran and refused the empty folder as a model.
    assert ABSENT not in message
    assert message.startswith(f"convtune bench serve: error: {tmp_path} is not a convtune artifact")


def test_bench_serve_refuses_an_unknown_peer_naming_the_known_ones(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", str(tmp_path), "--peers", "naive,torchserve"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert (
        "argument --peers: unknown peer torchserve; choose from naive, bentoml or none" in message
    )


def test_bentoml_peer_answers_what_the_artifact_does(exported, probe_images, monkeypatch) -> None:
    """Its preprocessing is PIL's, not convtune's (bicubic resizing of the whole image, where
    convtune shrinks the region it keeps by pixel-area averaging), and it answers the softmax
    of the logits without the artifact's temperature. So: its input is convtune's eval view
    up to resampling (a wrong crop or normalisation differs several times more), and each
    image gets the class that softmax of convtune's own eval view gives."""
    monkeypatch.setenv("CONVTUNE_PEER_ARTIFACT", str(exported.artifact_dir))
    peer, classifier = ImageClassifier(), OnnxClassifier(exported.artifact_dir)
    images = probe_images[:6]  # the generated PNGs: RGB, as the peer converts them
    for path in images:
        pixels = peer.preprocess(Image.open(path))
        assert np.abs(pixels - classifier.preprocess(classifier.decode(path))).mean() < 0.03
    answers = peer.classify([Image.open(path) for path in images])
    expected = reference_results(exported.artifact_dir, images, temperature=1.0)
    assert [max(answer, key=answer.__getitem__) for answer in answers] == [
        want["label"] for want in expected
    ]
    for answer, want in zip(answers, expected, strict=True):
        assert answer.keys() == want["probabilities"].keys()
        assert sum(answer.values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_bench_serve_runs_every_part_and_reports_them(exported, tmp_path) -> None:
    report_file = tmp_path / "serve.json"
    table = exported.run(
        "-m",
        "convtune",
        "bench",
        "serve",
        str(exported.artifact_dir),
        "--rounds",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--concurrency",
        "1,2",
        "--image-count",
        "3",
        "--image-size",
        "64",
        "--ceiling-seconds",
        "0.2",
        "--json",
        str(report_file),
        timeout=240,
    )  # fmt: skip  (exits non-zero on any 5xx)
    report = json.loads(report_file.read_text())
    median = report["median"]
    assert report["benchmark"] == "serve" and len(report["rounds"]) == 1
    assert set(median["ceiling_by_batch"]) == {"1", "2", "4", "8", "16", "32"}
    assert median["ceiling"]["batch_1_latency_ms"] > 0
    assert median["ceiling"]["decode_preprocess_ms"] > 0
    servers = ("service", "naive_peer", "bentoml_peer")
    for server in servers:
        assert set(median[server]) == {"1", "2"}
        for row in median[server].values():
            assert row["throughput_rps"] > 0 and row["server_errors"] == 0
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    # The CPU each request cost: the servers' threads and the load generator all worked.
    for server in servers:
        for row in median[server].values():
            cpu = row["cpu_ms_per_request"]
            assert cpu["server_main_threads"] > 0 and cpu["load_generator"] > 0
            parts = cpu["server_main_threads"] + cpu["server_other_threads"]
            assert cpu["server"] == pytest.approx(parts)
    assert "service CPU per request at 2 clients" in table
    # Every answer was a 200: the service and both peers classified the uploads, each
    # taking them as its route expects.
    for server in servers:
        for row in report["rounds"][0][server].values():
            assert row["statuses"] == {"200": row["requests"]}
    # The goals compare each load with the ceiling measured right before and after it.
    first = report["rounds"][0]
    for row in first["service"].values():
        around = row["ceiling_batch_1"]
        both = (around["before"]["latency_ms"], around["after"]["latency_ms"])
        assert around["latency_ms"] == pytest.approx(sum(both) / 2) and min(both) > 0
    alone = first["service"]["1"]
    overhead = alone["p50_ms"] - alone["ceiling_batch_1"]["latency_ms"]
    assert first["ratios"]["latency_overhead_ms"] == pytest.approx(overhead)
    assert "ceiling b1 around it" in table
    assert set(median["ratios"]) == {
        "service_vs_ceiling", "latency_overhead_ms", "service_vs_naive_peer",
        "service_vs_bentoml_peer", "p50_vs_bentoml_peer",
    }  # fmt: skip
    peer = first["bentoml_peer"]
    assert first["ratios"]["service_vs_bentoml_peer"] == pytest.approx(
        first["service"]["2"]["throughput_rps"] / peer["2"]["throughput_rps"]
    )
    assert first["ratios"]["p50_vs_bentoml_peer"] == pytest.approx(
        alone["p50_ms"] / peer["1"]["p50_ms"]
    )
    assert median["server_errors_where_bentoml_peer_failed"] == {"service": 0, "bentoml_peer": 0}
    for name in ("service", "naive peer", "bentoml peer"):
        assert f"{name}, 2 clients" in table
    assert "service req/s ÷ BentoML peer req/s at the highest concurrency ≥ 1.5" in table
