"""``python -m llmpress``: the command line (``llmpress.cli``)."""
import sys

from .cli import main

sys.exit(main())
