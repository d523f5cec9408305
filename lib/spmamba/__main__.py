"""``python -m spmamba ...`` is the same as the ``spmamba`` command."""
import sys

from spmamba.cli import main

sys.exit(main())
