"""convtune: fine-tune an ImageNet-pretrained timm encoder on your labelled images, export
one self-describing artifact, and serve it over HTTP with BentoML.

Subpackages, each importing only those before it: ``convtune.data`` ← ``convtune.models``
← ``convtune.training``; ``convtune.service`` imports ``data`` and ``models`` only.
"""

from pathlib import Path as _Path

# A wheel installs the subpackages inside this folder (pyproject.toml maps them there). A
# source checkout and a bento keep them as the top-level folders data/, models/, training/,
# service/ beside this one, so there the package's path is the folder that holds them;
# the checkout's benchmarks/ (developer tooling, never in the wheel) resolve the same way.
_here = _Path(__file__).resolve().parent
if not (_here / "data").is_dir() and (_here.parent / "data" / "__init__.py").is_file():
    __path__.append(str(_here.parent))
