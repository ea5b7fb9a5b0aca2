"""convtune: fine-tune an ImageNet-pretrained timm encoder on your labelled images, export
one self-describing artifact, and serve it over HTTP with BentoML.

Subpackages, each importing only those before it: ``convtune.data`` ← ``convtune.models``
← ``convtune.training``; ``convtune.service`` imports ``data`` and ``models`` only.
"""

import os as _os
from pathlib import Path as _Path

# Every entry point (the CLI, the service, the benchmarks, the tests) imports this package
# before albumentations or bentoml, so these hold everywhere: albumentations does not ask
# PyPI for a newer version on import, BentoML sends no usage data. A variable already set
# wins. Processes started by the bentoml CLI itself get them from bentofile.yaml's envs.
QUIET_ENVIRONMENT = {"NO_ALBUMENTATIONS_UPDATE": "1", "BENTOML_DO_NOT_TRACK": "true"}
for _name, _value in QUIET_ENVIRONMENT.items():
    _os.environ.setdefault(_name, _value)

# A wheel installs the subpackages inside this folder (pyproject.toml maps them there). A
# source checkout and a bento keep them as the top-level folders data/, models/, training/,
# service/ beside this one, so there the package's path is the folder that holds them;
# the checkout's benchmarks/ (developer tooling, never in the wheel) resolve the same way.
_here = _Path(__file__).resolve().parent
if not (_here / "data").is_dir() and (_here.parent / "data" / "__init__.py").is_file():
    __path__.append(str(_here.parent))
