"""``python -m llmpress``: the same command line as the ``llmpress`` script."""
import sys

from .cli import main

sys.exit(main())
