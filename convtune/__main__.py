"""``python -m convtune``: the same command line as the ``convtune`` script."""

from convtune.training.cli import main

raise SystemExit(main())
