"""The service's prediction path, in-process, where torch, lightning, timm and
albumentations cannot load.

One fresh interpreter blocks those packages, imports ``service.service``, builds the
service (model from the store) and classifies the probe images: once as one request, then
as concurrent requests, to check that the greedy batching merges requests and hands each
its own rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# The finder goes in before anything else is imported, so any import of a blocked package,
# direct or transitive, fails as if the package were not installed.
SCRIPT = """
import asyncio, json, sys, threading, time

# albumentations too: it imports torch wherever torch is installed, and the bento has neither.
BLOCKED = ("torch", "lightning", "pytorch_lightning", "timm", "torchvision", "albumentations")

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
try:
    import torch  # noqa
except ImportError:
    pass
else:
    raise SystemExit("the import blocker does not work")

import numpy as np
import convtune.service.service as module
from convtune.service.uploads import model_input

instance = module.Convtune()  # resolves convtune:latest from $BENTOML_HOME
calls = []  # images per onnxruntime call
run = instance.classifier.view_logits
queued_before_it_ends = [0]
# The first call of a scenario is held until the scenario's other requests are queued, so
# they all share the next call (a deadline only as a backstop against a hang).
def recorded(pixels):
    calls.append(len(pixels))
    deadline = time.monotonic() + 30
    while len(instance._batcher._queue) < queued_before_it_ends[0]:
        assert time.monotonic() < deadline, "the other requests never queued"
        time.sleep(0.001)
    queued_before_it_ends[0] = 0
    return run(pixels)

instance.classifier.view_logits = recorded

async def main():
    uploads = [(path, open(path, "rb").read()) for path in sys.argv[1:]]
    # The input of a request nobody cancels.
    pixels = model_input(
        instance.classifier, uploads, threading.Event(), max_pixels=instance.limits.max_pixels
    )
    results = await instance.classify(uploads, 99)
    # Queued together: one request per image, then 3 requests of 5x the images each.
    del calls[:]
    queued_before_it_ends[0] = len(pixels) - 1
    singles = await asyncio.gather(*(instance._batcher(lambda p=p: p[None]) for p in pixels))
    single_calls = calls[:]
    del calls[:]
    big = np.concatenate([pixels] * 5)
    queued_before_it_ends[0] = 2
    bigs = await asyncio.gather(*(instance._batcher(lambda: big) for _ in range(3)))
    return {
        "results": results,
        "singles": np.concatenate(singles).tolist(),
        "single_calls": single_calls,
        "bigs": [b.tolist() for b in bigs],
        "big_calls": calls[:],
    }

answer = asyncio.run(main())
answer["model"] = instance.tag
answer["max_batch"] = module.MAX_BATCH_SIZE
answer["loaded"] = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
print(json.dumps(answer))
"""


@pytest.fixture(scope="module")
def in_process(exported, probe_images) -> dict:
    stdout = exported.run("-c", SCRIPT, *map(str, probe_images), timeout=120)
    return json.loads(stdout.strip().splitlines()[-1])


def test_prediction_path_imports_no_torch(in_process, exported, expected_results) -> None:
    assert in_process["loaded"] == []
    assert in_process["model"] == exported.tag
    for result, expected in zip(in_process["results"], expected_results, strict=True):
        assert result["label"] == expected["label"]
        for name, probability in expected["probabilities"].items():
            assert result["probabilities"][name] == pytest.approx(probability, abs=1e-5)


def test_batching_merges_and_splits_requests(in_process, exported, expected_results) -> None:
    expected = np.array(
        [[r["probabilities"][c] for c in exported.classes] for r in expected_results]
    )
    # The first request runs at once; those that queued meanwhile share the next call, and
    # each gets its own row back.
    assert in_process["single_calls"] == [1, len(expected) - 1]
    np.testing.assert_allclose(in_process["singles"], expected, atol=1e-5)
    # Two of these requests together would pass the batch limit: one call each, never split.
    request = 5 * len(expected)
    assert 2 * request > in_process["max_batch"]
    assert in_process["big_calls"] == [request] * 3
    for rows in in_process["bigs"]:
        np.testing.assert_allclose(rows, np.concatenate([expected] * 5), atol=1e-5)
