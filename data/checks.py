"""Know a dataset before training on it: unreadable files, exact duplicates, class sizes,
image sizes and modes.

Cheap by design, so that it can run before every training run: each file is read once,
hashed, and its header parsed; no pixel is decoded. What is checked per file:

- every file: that it can be read, is not empty, and that Pillow identifies a format
  this project accepts (``ACCEPTED_FORMATS``) from a header that declares no more than
  ``DEFAULT_MAX_PIXELS`` pixels, the limit :func:`~convtune.data.images.decode_rgb` keeps;
- PNG: the whole chunk structure, up to the IEND chunk, with every chunk's CRC, which finds
  truncation and most damage (the compressed pixels are not inflated);
- JPEG: an end-of-image marker (FFD9) after the last start-of-scan marker, which finds
  truncation while allowing padding or other data after the image (damage inside the
  entropy-coded data is not found);
- WebP, BMP, GIF, TIFF: the header only; a truncated file of these formats passes.

Imports numpy, Pillow and rich only: ``convtune check-data`` must answer without torch.
"""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TextIO

from PIL import Image
from rich.console import Console
from rich.table import Table

from convtune.data.datasets import LabelledImages
from convtune.data.image_rules import structure_problem
from convtune.data.images import ACCEPTED_FORMATS, DEFAULT_MAX_PIXELS
from convtune.data.layouts import Dataset
from convtune.data.splits import Split, complete_split

WHOLE_DATASET = "all"  # the one part of a dataset that does not come split
DIGEST_SIZE = 16  # bytes of BLAKE2b: a chance collision is out of reach at any dataset size
# Kinds of duplicate group; a group can be of both of the last two kinds.
WITHIN_CLASS = "within a class"
ACROSS_CLASSES = "across classes"
ACROSS_PARTS = "across splits"
DUPLICATE_KINDS = (WITHIN_CLASS, ACROSS_CLASSES, ACROSS_PARTS)
_EXAMPLES = 3  # files named in one problem line
_LISTED_BAD_FILES = 10  # bad files the table lists; the JSON form lists all
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FileFacts:
    """What one read of a file tells: its content hash, header, and what is wrong with it."""

    digest: bytes | None  # None when the file could not be read or is empty
    size: tuple[int, int] | None = None  # (width, height) as stored, before EXIF rotation
    mode: str | None = None
    format: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class BadFile:
    index: int  # into the checked images
    path: Path
    reason: str


def inspect_file(path: Path) -> FileFacts:
    """Read ``path`` once: its BLAKE2b digest, its header, and the problem found, if any."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return FileFacts(None, problem=f"cannot be read: {error.strerror or error}")
    if not data:
        return FileFacts(None, problem="is empty (0 bytes)")
    digest = hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()
    # Before Pillow parses the header: for some hostile structures that parse alone costs
    # seconds, and decode_rgb would refuse the file for the same rule during training.
    if problem := structure_problem(data, max_pixels=DEFAULT_MAX_PIXELS):
        return FileFacts(digest, problem=problem)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.UnidentifiedImageError:
        problem = f"is not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
        return FileFacts(digest, problem=problem)
    except Image.DecompressionBombError:
        return FileFacts(digest, problem=f"declares more than {DEFAULT_MAX_PIXELS:,} pixels")
    # Pillow's parsers raise many types on a damaged header (SyntaxError, OSError,
    # struct.error, ...); to a caller they all mean the same thing.
    except Exception as error:
        return FileFacts(digest, problem=f"has a damaged header: {error}")
    width, height = image.size
    if width * height > DEFAULT_MAX_PIXELS:
        problem = f"is {width}x{height}, more than {DEFAULT_MAX_PIXELS:,} pixels"
    elif image.format == "PNG":
        problem = _png_problem(data)
    elif image.format in ("JPEG", "MPO"):
        problem = _jpeg_problem(data)
    else:
        problem = None
    return FileFacts(digest, image.size, image.mode, image.format, problem)


def _png_problem(data: bytes) -> str | None:
    """Walk the chunks from the signature to IEND, checking each one's CRC."""
    view = memoryview(data)
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        name = bytes(view[position + 4 : position + 8]).decode("latin-1")
        end = position + 12 + length
        if end > len(data):
            return f"is truncated: its PNG {name} chunk runs past the end of the file"
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4 : end - 4]) != crc:
            return f"is damaged: its PNG {name} chunk fails its CRC check"
        if name == "IEND":
            return None
        position = end
    return "is truncated: the PNG ends before its IEND chunk"


def _jpeg_problem(data: bytes) -> str | None:
    # Inside entropy-coded data every FF byte is followed by 00 or a restart marker, so an
    # FFD9 after the last start of scan (FFDA) can only be the image's end.
    last_scan = data.rfind(b"\xff\xda")
    if last_scan == -1 or data.find(b"\xff\xd9", last_scan) == -1:
        return "is truncated: the JPEG has no end-of-image marker after its last scan"
    return None


@dataclass(frozen=True)
class DataCheck:
    """What :func:`check_dataset` found: counts per class and part, bad files, duplicate
    groups (indices into ``images`` of identical files), image sizes, modes and formats."""

    images: LabelledImages
    part_names: tuple[str, ...]
    part_of: tuple[str, ...]  # each image's part
    digests: tuple[bytes | None, ...]  # each image's content hash, None if unreadable
    bad_files: tuple[BadFile, ...]
    duplicate_groups: tuple[tuple[int, ...], ...]  # readable images only, each sorted
    sizes: Counter[tuple[int, int]]
    modes: Counter[str]
    formats: Counter[str]

    @cached_property
    def counts(self) -> dict[str, dict[str, int]]:
        """Images per part, then per class (every class listed, in class order)."""
        counts = {part: dict.fromkeys(self.images.classes, 0) for part in self.part_names}
        for label, part in zip(self.images.labels, self.part_of, strict=True):
            counts[part][self.images.classes[label]] += 1
        return counts

    def class_counts(self) -> dict[str, int]:
        """Images per class over all parts."""
        return {
            name: sum(self.counts[part][name] for part in self.part_names)
            for name in self.images.classes
        }

    def distinct_counts(self, part: str) -> dict[str, int]:
        """Distinct readable images per class in ``part``: what a split of it counts."""
        contents: dict[str, set[bytes]] = {name: set() for name in self.images.classes}
        unreadable = {bad.index for bad in self.bad_files}
        for index, digest in enumerate(self.digests):
            if self.part_of[index] == part and index not in unreadable and digest is not None:
                contents[self.images.classes[self.images.labels[index]]].add(digest)
        return {name: len(digests) for name, digests in contents.items()}

    def duplicate_kinds(self, group: Sequence[int]) -> tuple[str, ...]:
        """:data:`WITHIN_CLASS`, or :data:`ACROSS_CLASSES` and/or :data:`ACROSS_PARTS`."""
        kinds = []
        if len({self.images.labels[i] for i in group}) > 1:
            kinds.append(ACROSS_CLASSES)
        if len({self.part_of[i] for i in group}) > 1:
            kinds.append(ACROSS_PARTS)
        return tuple(kinds) or (WITHIN_CLASS,)

    def duplicates(self, kind: str) -> list[tuple[int, ...]]:
        """The duplicate groups of ``kind``."""
        return [group for group in self.duplicate_groups if kind in self.duplicate_kinds(group)]

    def problems(self, *, skip_bad_images: bool, allow_duplicates: bool) -> list[str]:
        """One line per reason for training to refuse this data, each naming the fix."""
        problems = []
        if self.bad_files and not skip_bad_images:
            named = "; ".join(f"{bad.path} {bad.reason}" for bad in self.bad_files[:_EXAMPLES])
            more = len(self.bad_files) - _EXAMPLES
            problems.append(
                f"{len(self.bad_files)} image file(s) cannot be used: {named}"
                f"{f'; and {more} more' if more > 0 else ''}. "
                "Fix or remove them, or pass --skip-bad-images to train without them"
            )
        if allow_duplicates:
            return problems
        if leaking := self.duplicates(ACROSS_PARTS):
            problems.append(
                f"{len(leaking)} image(s) have exact copies in another split (leakage), e.g. "
                f"{self._example(leaking[0], self.part_of)}. Remove the copies, "
                "or pass --allow-duplicates"
            )
        if conflicting := self.duplicates(ACROSS_CLASSES):
            labels = [self.images.classes[label] for label in self.images.labels]
            problems.append(
                f"{len(conflicting)} image(s) have exact copies in another class (conflicting "
                f"labels), e.g. {self._example(conflicting[0], labels)}. Remove or relabel "
                "them, or pass --allow-duplicates"
            )
        return problems

    def warnings(self) -> list[str]:
        """One line per finding that does not stop training but is worth knowing."""
        within = [g for g in self.duplicate_groups if self.duplicate_kinds(g) == (WITHIN_CLASS,)]
        if not within:
            return []
        copies = sum(len(group) - 1 for group in within)
        first = within[0]
        return [
            f"{copies} image(s) are exact copies of another in the same class and split, e.g. "
            f"{self.images.paths[first[0]]} = {self.images.paths[first[1]]}: harmless, but "
            "each copy weighs its image once more in training"
        ]

    def _example(self, group: Sequence[int], where: Sequence[str]) -> str:
        """Two files of ``group`` that differ in ``where`` (each image's part or class)."""
        first = group[0]
        other = next(i for i in group if where[i] != where[first])
        return (
            f"{self.images.paths[first]} ({where[first]}) = "
            f"{self.images.paths[other]} ({where[other]})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything found, as JSON-ready data (``check-data --format json``)."""
        return {
            "images": len(self.images),
            "classes": list(self.images.classes),
            "parts": list(self.part_names),
            "counts": self.counts,
            "bad_files": [{"path": str(bad.path), "reason": bad.reason} for bad in self.bad_files],
            "duplicates": [
                {
                    "kinds": list(self.duplicate_kinds(group)),
                    "paths": [str(self.images.paths[i]) for i in group],
                    "classes": [self.images.classes[self.images.labels[i]] for i in group],
                    "parts": [self.part_of[i] for i in group],
                }
                for group in self.duplicate_groups
            ],
            "sizes": {
                "distinct": len(self.sizes),
                "most_common": [
                    {"width": w, "height": h, "images": n} for (w, h), n in self.common_sizes()
                ],
                "smallest": list(min(self.sizes, key=_area)) if self.sizes else None,
                "largest": list(max(self.sizes, key=_area)) if self.sizes else None,
            },
            "modes": dict(self.modes.most_common()),
            "formats": dict(self.formats.most_common()),
        }

    def common_sizes(self, count: int = 3) -> list[tuple[tuple[int, int], int]]:
        return self.sizes.most_common(count)


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def check_dataset(
    images: LabelledImages,
    parts: Mapping[str, Sequence[int]] | None = None,
    *,
    progress: bool = False,
    workers: int = 1,
) -> DataCheck:
    """Read every image of ``images`` once and say what is in the dataset.

    ``parts``: the indices of each part (``train``, ``val``, ``test``) of a dataset that
    comes split; every image in exactly one. None: one part, :data:`WHOLE_DATASET`.
    ``workers`` > 1 reads files on that many threads: worth it where reads wait (network
    file systems); on a local disk the work is Python holding the GIL, and one is fastest
    (docs/benchmarks.md). ``progress``: a progress bar on stderr, when it is a terminal.
    """
    part_names, part_of = _parts_of(len(images), parts)
    facts = list(_inspect_all(images.paths, progress=progress, workers=workers))
    bad_files = tuple(
        BadFile(index, images.paths[index], fact.problem)
        for index, fact in enumerate(facts)
        if fact.problem is not None
    )
    groups: dict[bytes, list[int]] = {}
    for index, fact in enumerate(facts):
        if fact.problem is None and fact.digest is not None:
            groups.setdefault(fact.digest, []).append(index)
    readable = [fact for fact in facts if fact.problem is None]
    return DataCheck(
        images=images,
        part_names=part_names,
        part_of=part_of,
        digests=tuple(fact.digest for fact in facts),
        bad_files=bad_files,
        duplicate_groups=tuple(tuple(g) for g in groups.values() if len(g) > 1),
        sizes=Counter(fact.size for fact in readable if fact.size is not None),
        modes=Counter(fact.mode for fact in readable if fact.mode is not None),
        formats=Counter(fact.format for fact in readable if fact.format is not None),
    )


def _parts_of(
    count: int, parts: Mapping[str, Sequence[int]] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The part names, and each image's part."""
    if parts is None:
        return (WHOLE_DATASET,), (WHOLE_DATASET,) * count
    part_of: list[str | None] = [None] * count
    for name, indices in parts.items():
        for index in indices:
            if part_of[index] is not None:
                raise ValueError(f"image {index} is in both the {part_of[index]} and {name} parts")
            part_of[index] = name
    if None in part_of:
        raise ValueError(f"image {part_of.index(None)} is in none of the parts {list(parts)}")
    return tuple(parts), tuple(part_of)  # type: ignore[arg-type]


def _inspect_all(paths: Sequence[Path], *, progress: bool, workers: int) -> Iterator[FileFacts]:
    # The check reports an oversized canvas itself; Pillow's warning about one would only
    # repeat it, out of place.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                yield from _tracked(pool.map(inspect_file, paths), len(paths), progress)
        else:
            yield from _tracked(map(inspect_file, paths), len(paths), progress)


def _tracked(facts: Iterable[FileFacts], total: int, progress: bool) -> Iterable[FileFacts]:
    if not (progress and sys.stderr.isatty()):
        return facts
    from rich.progress import track

    return track(facts, total=total, description="Checking images", transient=True)


def plan_split(
    dataset: Dataset,
    check: DataCheck,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[Dataset, Split]:
    """``dataset`` without its unreadable files, and its split: the parts it comes with,
    the others carved out of train with copies of an image kept in one part
    (:func:`~convtune.data.splits.complete_split`)."""
    usable = dataset.without({bad.path for bad in check.bad_files})
    position = {path: i for i, path in enumerate(usable.images.paths)}
    groups = [[position[check.images.paths[i]] for i in group] for group in check.duplicate_groups]
    split = complete_split(
        usable.images.labels,
        usable.images.classes,
        given=usable.parts,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        groups=groups,
    )
    return usable, split


def print_check(check: DataCheck, file: TextIO) -> None:
    """The table, then one line each for the bad files, image sizes, modes and formats.

    The lines are not wrapped, so that each path stays whole and on one line."""
    console = Console(file=file, highlight=False)
    console.print(render_table(check))
    for line in summary_lines(check):
        console.print(line, soft_wrap=True, markup=False)


def render_table(check: DataCheck) -> Table:
    """Images per class and part, then rows of unreadable files and copies of each kind."""
    parts = check.part_names
    split = parts != (WHOLE_DATASET,)
    table = Table(title="images per class" + (" and split" if split else ""))
    table.add_column("class")
    for part in parts if split else ():
        table.add_column(part, justify="right")
    table.add_column("total" if split else "images", justify="right")
    for name in check.images.classes:
        table.add_row(name, *_cells(check, {part: check.counts[part][name] for part in parts}))
    table.add_section()
    table.add_row("all classes", *_cells(check, Counter(check.part_of)))
    table.add_section()
    bad = [bad.index for bad in check.bad_files]
    table.add_row("unreadable", *_cells(check, Counter(check.part_of[i] for i in bad)))
    for kind in DUPLICATE_KINDS if split else (WITHIN_CLASS, ACROSS_CLASSES):
        members = [i for group in check.duplicates(kind) for i in group]
        table.add_row(f"copies {kind}", *_cells(check, Counter(check.part_of[i] for i in members)))
    return table


def _cells(check: DataCheck, per_part: Mapping[str, int]) -> list[str]:
    """A row's counts per part, then their total; the total alone for one part."""
    cells = [f"{per_part.get(part, 0):,}" for part in check.part_names]
    total = f"{sum(per_part.values()):,}"
    return [*cells, total] if len(cells) > 1 else [total]


def summary_lines(check: DataCheck) -> list[str]:
    """The bad files (the first few) with their reasons, then the sizes, modes, formats."""
    lines = [f"unreadable: {bad.path} {bad.reason}" for bad in check.bad_files[:_LISTED_BAD_FILES]]
    if len(check.bad_files) > _LISTED_BAD_FILES:
        more = len(check.bad_files) - _LISTED_BAD_FILES
        lines.append(f"unreadable: and {more} more (--format json lists them all)")
    if check.sizes:
        common = ", ".join(f"{w}×{h} ({n:,})" for (w, h), n in check.common_sizes())
        smallest, largest = min(check.sizes, key=_area), max(check.sizes, key=_area)
        extent = (
            f"; {len(check.sizes):,} distinct, smallest {smallest[0]}×{smallest[1]}, "
            f"largest {largest[0]}×{largest[1]}"
            if len(check.sizes) > 1
            else ""
        )
        lines.append(f"sizes: {common}{extent}")
    for name, counter in (("modes", check.modes), ("formats", check.formats)):
        if counter:
            lines.append(f"{name}: " + ", ".join(f"{k} ({n:,})" for k, n in counter.most_common()))
    return lines
