"""Test-wide settings: verify the IR after every pass of every compile."""
import os

os.environ.setdefault("BLADE_DEBUG", "1")
