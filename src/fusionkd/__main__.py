"""``python -m fusionkd ...`` (and ``torchrun ... -m fusionkd train ...``)."""

from .cli import main

raise SystemExit(main())
