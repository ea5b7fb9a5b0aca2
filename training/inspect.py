"""``convtune inspect``: the network as the lecture notes draw it, from its artifact alone.

The encoder is a stack of stages, each turning a volume of feature maps (channels x height
x width) into a smaller, deeper one; the head pools the last volume to one feature vector
and a fully connected layer turns that into one score per class, which softmax makes
probabilities. One table row per stage (its volume at the model's input size, its stride
from the input, its parameters and multiply-adds, as export recorded them), then the
pooling and the head. With an image: each stage's most active feature maps as a PNG grid,
and the prediction. No torch: the graph's own outputs give the feature maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convtune.models.artifact import ExplainOutputs, FeatureVolume, Manifest
from convtune.models.cam import feature_grid, most_active_channels, png_bytes
from convtune.models.inference import OnnxClassifier, format_prediction

GRID_CHANNELS = 16  # feature maps per stage grid: a 4 x 4 grid


def stage_rows(manifest: Manifest, explain: ExplainOutputs) -> list[dict[str, Any]]:
    """The table's rows: the input, each stage, the last volume where layers follow the
    last stage, the pooling and the head."""
    height, width = manifest.preprocessing.input_size
    rows: list[dict[str, Any]] = [
        {"layer": "input", "volume": f"3×{height}×{width}", "stride": 1, "parameters": 0, "macs": 0}
    ]
    rows += [_volume_row(f"stage {k}", stage) for k, stage in enumerate(explain.stages, 1)]
    last = explain.stages[-1] if explain.stages else None
    features = explain.features
    if last is None or features.parameters or features.channels != last.channels:
        rows.append(_volume_row("features", features))
    rows.append(
        {"layer": f"pooling ({explain.pooling})", "volume": f"{features.channels}",
         "stride": None, "parameters": 0, "macs": 0}
    )  # fmt: skip
    rows.append(
        {"layer": "head (fully connected)", "volume": f"{manifest.num_classes} classes",
         "stride": None, "parameters": explain.head_parameters, "macs": explain.head_macs}
    )  # fmt: skip
    return rows


def _volume_row(layer: str, volume: FeatureVolume) -> dict[str, Any]:
    return {
        "layer": layer,
        "volume": f"{volume.channels}×{volume.height}×{volume.width}",
        "stride": volume.stride,
        "parameters": volume.parameters,
        "macs": volume.macs,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned text, with totals of parameters and multiply-adds."""
    header = ("layer", "volume (C×H×W)", "stride", "parameters", "multiply-adds")
    cells = [
        (row["layer"], row["volume"], "" if row["stride"] is None else str(row["stride"]),
         f"{row['parameters']:,}", _short(row["macs"]))
        for row in rows
    ]  # fmt: skip
    total_parameters = sum(row["parameters"] for row in rows)
    cells.append(("total", "", "", f"{total_parameters:,}", _short(sum(r["macs"] for r in rows))))
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [header, *cells]
    ]
    return "\n".join(lines)


def _short(count: int) -> str:
    """A count of multiply-adds in the units papers use (M, G)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def write_stage_grids(
    classifier: OnnxClassifier, image: Path, out_dir: Path, *, top_k: int = 3
) -> dict[str, Any]:
    """One PNG per stage of ``image``'s most active feature maps in ``out_dir``; return the
    prediction and the files written."""
    explain = classifier.explain_outputs()
    rgb = classifier.decode(image)
    explained = classifier.explain(classifier.preprocess(rgb)[np.newaxis])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, stage in enumerate(explain.stages, 1):
        volume = explained.stages[stage.output][0]
        path = out_dir / f"stage_{k}.png"
        path.write_bytes(
            png_bytes(feature_grid(volume, most_active_channels(volume, GRID_CHANNELS)))
        )
        written.append(str(path))
    prediction = format_prediction(explained.probabilities[0], classifier.classes, top_k)
    return {"image": str(image), **prediction, "feature_maps": written}
