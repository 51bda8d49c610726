"""``python -m sapretrain.cli <command> ...``: the same as the ``sapretrain`` command."""
from sapretrain.cli import main

raise SystemExit(main())
