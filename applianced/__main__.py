"""Entry point for ``python -m applianced``: runs the daemon."""

from applianced.daemon import main

raise SystemExit(main())
