"""``python -m dualpipe_plugin.bench.compare readme [results.json]``: regenerate the README table."""

from dualpipe_plugin.bench.compare.cli import main

raise SystemExit(main())
