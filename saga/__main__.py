"""The ``saga`` command line (``python -m saga``, or the ``saga`` console script).

The commands live in :mod:`saga._cli`; run ``saga --help`` for the list.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command; returns its exit code (see :mod:`saga._cli`)."""
    from saga._cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
