"""`python -m blade` runs the command line."""
import sys

from blade.tools.cli import main

sys.exit(main())
