"""The service's whole prediction path runs where torch, lightning and timm cannot load."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter. The finder goes in before anything else is imported, so
# any import of a blocked package, direct or transitive, fails as if it were not installed.
SCRIPT = """
import asyncio, json, sys

BLOCKED = ("torch", "lightning", "pytorch_lightning", "timm", "torchvision")

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

import service.service as module

instance = module.Convtune()  # resolves convtune:latest from $BENTOML_HOME

async def classify():
    try:
        uploads = [(path, open(path, "rb").read()) for path in sys.argv[1:]]
        return await instance.classify(uploads, 99)
    finally:
        instance.stop_batching()

results = asyncio.run(classify())
loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
print(json.dumps({"model": instance.tag, "results": results, "loaded": loaded}))
"""


def test_prediction_path_without_torch(exported, probe_images, cli_results) -> None:
    stdout = exported.run("-c", SCRIPT, *map(str, probe_images), timeout=120)
    answer = json.loads(stdout.strip().splitlines()[-1])
    assert answer["loaded"] == []
    assert answer["model"] == exported.tag
    for result, expected in zip(answer["results"], cli_results, strict=True):
        assert result["label"] == expected["label"]
        for name, probability in expected["probabilities"].items():
            assert result["probabilities"][name] == pytest.approx(probability, abs=1e-5)
