"""Every default the README states is the one the code uses, so the two cannot drift apart.

The README is parsed, never copied: each documented value is read from its text (a row of
a table, a flag's ``[default]``, a figure in a sentence) and compared with the code's own
default: FitConfig's fields, the command-line parsers, ``service.http.Limits``, the
service's settings. An edit to either side that breaks the agreement fails here; so does
a rewording that hides a value from its pattern, naming the words that went missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from helpers import service_declaration

from convtune.service import batching, uploads
from convtune.service.http import DEFAULT_TOP_K, MAX_BOUNDARY_PADDING, MAX_FORM_FIELDS, Limits
from convtune.training import fit, metrics, tracking
from convtune.training.cli import build_parser
from convtune.training.config import CommandLineOption, command_line_options

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# The units the README writes values in, as multiples of the code's (bytes, pixels, s).
UNITS = {"KiB": 1024, "MiB": 1024**2, "Mpx": 1_000_000, "s": 1}


def prose(text: str) -> str:
    """``text`` without its fenced code blocks, each run of whitespace one space: a value
    wrapped across lines reads as one sentence."""
    return " ".join(re.sub(r"^```.*?^```", "", text, flags=re.M | re.S).split())


def section(heading: str) -> str:
    """The README under ``heading`` (of any level), to the next heading of that level or
    above; a comment in a code block is no heading."""
    level, in_code, taken = 0, False, []
    for line in README.splitlines():
        in_code ^= line.startswith("```")
        found = None if in_code else re.match(r"(#+) (.*)", line)
        if found and level and len(found[1]) <= level:
            break
        if found and found[2] == heading:
            level = len(found[1])
        elif level:
            taken.append(line)
    assert taken, f"the README has no section {heading!r}"
    return "\n".join(taken)


def table(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table in ``text`` whose header row starts with
    ``header``, each cell stripped of spaces and backticks."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:  # after the header row and its --- row
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def quantity(text: str) -> float:
    """A documented figure in the code's units: ``"16 KiB"`` → 16384, ``"40-Mpx"`` → 4e7,
    ``"30 s"`` → 30, ``"0.99"`` → 0.99."""
    number, unit = re.fullmatch(r"([\d.]+)(?:[ -](\w+))?", text).groups()
    return float(number) * (UNITS[unit] if unit else 1)


def parsed_default(dest: str, *command: str) -> Callable[[], Any]:
    """What the command line ``command`` (a command and its required arguments) leaves in
    ``dest``: that command's default for the option."""
    return lambda: getattr(build_parser().parse_args(command), dest)


def limit(name: str) -> Callable[[], int]:
    return lambda: getattr(Limits(), name)


def traffic(name: str) -> Callable[[], Any]:
    return lambda: service_declaration().arguments["traffic"][name]


def service_constant(name: str) -> Callable[[], Any]:
    return lambda: service_declaration().constants[name]


def makefile_torch_spec() -> str:
    return re.search(r"^TORCH_SPEC \?= (.*)$", (REPO / "Makefile").read_text(), re.M)[1]


@dataclass(frozen=True)
class Stated:
    """A default the README states in a sentence or a table cell: under ``heading``,
    ``pattern``'s one group (its whitespace single spaces), and the code's value."""

    heading: str
    pattern: str
    actual: Callable[[], Any]


def stated(name: str, heading: str, pattern: str, actual: Callable[[], Any]) -> Any:
    return pytest.param(Stated(heading, pattern, actual), id=name)


HTTP = "The HTTP service"
PREDICT = ("predict", "MODEL", "PATH")
EXPORT = ("export", "RUN_DIR", "--name", "NAME")
STATED = [
    stated("torch-spec", "Quick start", r"default `([^`]+)`\)", makefile_torch_spec),
    stated("predict-batch-size", "Your data", r"\((\d+) images; predict's `--batch-size`\)",
           parsed_default("batch_size", *PREDICT)),
    stated("bn-recalibration-images", "Your data", r"re-estimated on (\d+) training images",
           lambda: fit._RECALIBRATION_IMAGES),
    stated("mlflow-experiment", "Tracking runs", r"`\$MLFLOW_EXPERIMENT_NAME` \[(\w+)\]",
           lambda: tracking._DEFAULT_EXPERIMENT),
    stated("ece-bins", "Calibrated probabilities", r"\((\d+) equal-width confidence bins\)",
           lambda: metrics.ECE_BINS),
    stated("calibration-images", "An int8 artifact", r"`--calibration-images` \((\d+)\)",
           parsed_default("calibration_images", *EXPORT)),
    stated("calibration-method", "An int8 artifact", r"`--calibration-method` \(`(\w+)`",
           parsed_default("calibration_method", *EXPORT)),
    stated("min-agreement", "An int8 artifact", r"`--min-agreement` \(([\d.]+)\)",
           parsed_default("min_agreement", *EXPORT)),
    stated("max-accuracy-drop", "An int8 artifact", r"`--max-accuracy-drop` \(([\d.]+)\)",
           parsed_default("max_accuracy_drop", *EXPORT)),
    stated("top-k-form", "Calling the service", r"optional `top_k` \[(\d+)\]",
           lambda: DEFAULT_TOP_K),
    stated("top-k-route", HTTP, r"a positive integer, default (\d+)", lambda: DEFAULT_TOP_K),
    stated("model", HTTP, r"`\$CONVTUNE_MODEL` \(default `([^`]+)`\)",
           service_constant("DEFAULT_MODEL")),
    stated("batch-inputs", HTTP, r"up to (\d+) inputs", service_constant("MAX_BATCH_SIZE")),
    stated("lanes", HTTP, r"one per core plus one, at most (\d+)",
           lambda: batching.MAX_DEFAULT_LANES),
    # The errors table.
    stated("400-padding", HTTP, r"over (\d+) spaces after a boundary",
           lambda: MAX_BOUNDARY_PADDING),
    stated("408-head-time", HTTP, r"headers took over (\d+ s)", limit("header_timeout_s")),
    stated("414-url", HTTP, r"a URL over (\d+ KiB)", limit("max_url_bytes")),
    stated("429-concurrency", HTTP, r"`traffic.max_concurrency` \((\d+)\)",
           traffic("max_concurrency")),
    stated("431-head", HTTP, r"headers over (\d+ KiB)", limit("max_header_bytes")),
    stated("503-queue-wait", HTTP, r"waited over (\d+ s) in the batching queue",
           service_constant("MAX_QUEUE_WAIT_S")),
    stated("504-timeout", HTTP, r"`traffic.timeout` \((\d+ s)\)", traffic("timeout")),
    # What an image may cost, under the limits table.
    stated("decode-cost-pixels", HTTP, r"at the (\d+ Mpx) limit", limit("max_pixels")),
    stated("decode-cost-request", HTTP, r"at the (\d+ Mpx) request limit",
           limit("max_request_pixels")),
    stated("inline-decode-bytes", HTTP, r"Uploads of up to (\d+ MiB) that declare",
           lambda: uploads.INLINE_DECODE_MAX_BYTES),
    stated("inline-decode-pixels", HTTP, r"that declare up to (\d+ Mpx) together",
           lambda: uploads.INLINE_DECODE_MAX_PIXELS),
    # The hostile-clients table, and what is left to a proxy.
    stated("hostile-head-bytes", HTTP, r"at most (\d+ KiB) of head buffered",
           limit("max_header_bytes")),
    stated("hostile-head-time", HTTP, r"(\d+ s) per head", limit("header_timeout_s")),
    stated("hostile-slots", HTTP, r"one of the (\d+) concurrency slots",
           traffic("max_concurrency")),
    stated("hostile-body-grace", HTTP, r"past (\d+ s) it must average",
           limit("slow_body_grace_s")),
    stated("hostile-body-rate", HTTP, r"must average (\d+ KiB)/s", limit("min_body_rate")),
    stated("hostile-body-bytes", HTTP, r"(\d+ MiB) per request, counted",
           limit("max_upload_bytes")),
    stated("hostile-requests", HTTP, r"(\d+) requests in the application at once",
           traffic("max_concurrency")),
    stated("hostile-request-time", HTTP, r"at once; (\d+ s) each \(504\)", traffic("timeout")),
    stated("hostile-parts", HTTP, r"at most files \+ (\d+) parts", lambda: MAX_FORM_FIELDS),
    stated("hostile-padding", HTTP, r"(\d+) bytes of padding", lambda: MAX_BOUNDARY_PADDING),
    stated("hostile-request-pixels", HTTP, r"a request within (\d+ Mpx)",
           limit("max_request_pixels")),
    stated("proxy-body-bytes", HTTP, r"a body being read costs up to (\d+ MiB)",
           limit("max_upload_bytes")),
    # The replicas table.
    stated("replica-concurrency", "Scale out", r"`max_concurrency` (\d+) \|",
           traffic("max_concurrency")),
    stated("replica-requests", "Scale out", r"the deployment takes replicas × (\d+)",
           traffic("max_concurrency")),
    stated("replica-timeout", "Scale out", r"\| timeout (\d+ s) \|", traffic("timeout")),
    stated("replica-pixels", "Scale out", r"at the (\d+-Mpx) limit", limit("max_pixels")),
]  # fmt: skip


@pytest.mark.parametrize("claim", STATED)
def test_a_default_stated_in_the_readme_is_the_codes(claim: Stated) -> None:
    found = re.findall(claim.pattern, prose(section(claim.heading)))
    assert found, f"README, {claim.heading}: nothing matches {claim.pattern!r} any more"
    actual = claim.actual()
    for text in found:
        documented = text if isinstance(actual, str) else quantity(text)
        expected = actual if isinstance(actual, str) else pytest.approx(actual, rel=1e-12)
        assert documented == expected, f"README, {claim.heading}: {text!r}; code: {actual!r}"


def test_the_limits_table_documents_every_limit_with_its_default() -> None:
    rows = table(section(HTTP), "| variable | default |")
    defaults = asdict(Limits())
    documented = {}
    for variable, default, _ in rows:
        # The limit the variable sets, found by setting it rather than from its spelling.
        limits = asdict(Limits.from_env({variable: "123456789"}))
        changed = [name for name, value in limits.items() if value != defaults[name]]
        assert len(changed) == 1, f"{variable} sets {changed or 'no limit'}"
        documented[changed[0]] = int(default)
    assert documented == defaults  # every limit, each with its default
    assert len(rows) == len(fields(Limits))  # and one row each


def bracketed_fit_defaults() -> list[tuple[str, str]]:
    """Every ``--flag ...`` [default] in the README, a parenthesis between them or not."""
    pattern = r"`(--[a-z0-9-]+)(?: [^`]*)?`(?: \([^()]*\))? \[([^\]]+)\]"
    return sorted(set(re.findall(pattern, prose(README))))


BRACKETED = bracketed_fit_defaults()


def test_the_readme_gives_fit_options_defaults_in_brackets() -> None:
    # Guards the test below: a README reworded out of its pattern would leave it nothing.
    assert len({flag for flag, _ in BRACKETED}) >= 20, BRACKETED


@pytest.mark.parametrize(("flag", "text"), BRACKETED, ids=[flag for flag, _ in BRACKETED])
def test_a_bracketed_default_is_fits_default(flag: str, text: str) -> None:
    options: dict[str, CommandLineOption] = {o.flag: o for o in command_line_options()}
    assert flag in options, f"the README gives a default for {flag}, which fit does not take"
    option = options[flag]
    # "[0.01, the head's]", "[0 = off]": the value, then words about it. "[the model's]",
    # "[the same]": a default derived at run time, which FitConfig leaves as None.
    value = re.split(r", | = ", text)[0]
    documented = None if value.startswith("the ") else option.parse(value)
    assert documented == option.default, f"README: {flag} [{text}]; fit: {option.default!r}"
