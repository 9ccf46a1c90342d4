"""`python -m blade` runs the command line."""
import sys

from blade.cli import main

sys.exit(main())
