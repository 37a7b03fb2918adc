"""``python -m alignkit ...`` (what ``torchrun ... -m alignkit <loop>`` runs on every rank): the CLI."""

from alignkit.cli import main

raise SystemExit(main())
