"""The peer a user would otherwise ship: the FastAPI + PIL + torchvision + eager-torch service
from most tutorials, serving the same weights as a convtune artifact.

Per request it reads the upload, decodes it with PIL, applies a torchvision transform (resize,
center crop, normalise) and runs the model's eager forward under ``torch.no_grad()`` inside
the ``async`` endpoint, then answers the softmax per class. It is deliberately not tuned: it
is the baseline ``convtune bench serve`` measures convtune's service against. The artifact
directory comes from ``$CONVTUNE_PEER_ARTIFACT``::

    CONVTUNE_PEER_ARTIFACT=runs/x/artifact python -m uvicorn convtune.benchmarks.naive_peer:app
"""

from __future__ import annotations

import io
import os
from typing import Annotated

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from convtune.models.artifact import WEIGHTS_FILE, read_manifest
from convtune.models.factory import rebuild_model

ARTIFACT = os.environ["CONVTUNE_PEER_ARTIFACT"]

manifest = read_manifest(ARTIFACT)
model = rebuild_model(manifest.to_json())
model.load_state_dict(load_file(os.path.join(ARTIFACT, WEIGHTS_FILE)))
model.eval()

size = manifest.preprocessing.input_size[0]
preprocess = transforms.Compose(
    [
        transforms.Resize(int(size / manifest.preprocessing.crop_pct)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(manifest.preprocessing.mean, manifest.preprocessing.std),
    ]
)

app = FastAPI()


@app.get("/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
async def predict(image: Annotated[UploadFile, File()]) -> dict:
    picture = Image.open(io.BytesIO(await image.read())).convert("RGB")
    with torch.no_grad():
        logits = model(preprocess(picture).unsqueeze(0))
    probabilities = torch.softmax(logits[0], dim=0).tolist()
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {
        "label": manifest.classes[best],
        "probabilities": dict(zip(manifest.classes, probabilities, strict=True)),
    }
