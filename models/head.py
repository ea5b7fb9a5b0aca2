"""The classifier head put on top of a pretrained encoder, with explicit initialisation.

Weights start small and random, never zero (zero weights would keep every unit of a
layer identical). Hidden layers use the init that keeps activations' variance stable
for their non-linearity: Kaiming/He (variance 2 / fan_in) for the ReLU family,
Xavier/Glorot (variance 2 / (fan_in + fan_out)) for tanh and sigmoid. The output layer
starts with a small normal (std 0.01) so the initial softmax is close to uniform and the
first gradients do not disturb the encoder.
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_RELU_FAMILY = {"relu", "gelu", "silu"}
OUTPUT_INIT_STD = 0.01


def build_head(
    in_features: int,
    num_classes: int,
    *,
    hidden_features: int = 0,
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Sequential:
    """``[Dropout] → [Linear → activation → Dropout] → Linear`` producing logits."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown head activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    if hidden_features > 0:
        hidden = nn.Linear(in_features, hidden_features)
        init_hidden_linear(hidden, activation)
        layers += [hidden, ACTIVATIONS[activation]()]
        in_features = hidden_features
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    output = nn.Linear(in_features, num_classes)
    nn.init.normal_(output.weight, mean=0.0, std=OUTPUT_INIT_STD)
    nn.init.zeros_(output.bias)
    layers.append(output)
    return nn.Sequential(*layers)


def init_hidden_linear(layer: nn.Linear, activation: str) -> None:
    if activation in _RELU_FAMILY:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    else:
        nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
