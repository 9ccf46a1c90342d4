"""Let a benchmark `import blade` from this checkout when blade is not pip-installed (a bare GPU machine).

The wheel maps blade/ -> blade, passes/ -> blade.passes, backends/ -> blade.backends and
models/ -> blade.models (pyproject's package-dir), so putting the repository root on sys.path is not
enough. Importing this module installs, at the front of sys.meta_path, a finder that serves those
four packages from this checkout; their submodules (blade.backends.triton...) are then found through
each package's __path__ as usual. Nothing is executed until something imports blade.

A no-op when blade is already imported or importable as installed (a wheel or `pip install -e .`).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"blade": REPO / "blade", "blade.passes": REPO / "passes", "blade.backends": REPO / "backends",
            "blade.models": REPO / "models"}


class RepoFinder(importlib.abc.MetaPathFinder):
    """Finds blade and its mapped subpackages in the checkout."""

    def find_spec(self, fullname, path=None, target=None):
        folder = PACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def installed() -> bool:
    """Whether `import blade` already works with its subpackages mapped (without importing anything)."""
    if "blade" in sys.modules:
        return True
    spec = importlib.util.find_spec("blade")
    if spec is None or spec.origin is None:
        return False
    if (Path(spec.origin).parent / "backends" / "__init__.py").is_file():
        return True  # an installed wheel: the subpackages sit inside blade/
    for finder in sys.meta_path:  # an editable install: its finder maps blade.backends to backends/
        if finder is importlib.machinery.PathFinder or isinstance(finder, RepoFinder):
            continue  # PathFinder would look for a top-level 'backends' on sys.path: not a mapping
        find_spec = getattr(finder, "find_spec", None)
        try:
            if find_spec is not None and find_spec("blade.backends", None) is not None:
                return True
        except Exception:  # a foreign finder that cannot answer for a dotted name
            continue
    return False


def activate() -> bool:
    """Serve blade from this checkout unless it is installed; True when the finder was installed."""
    if installed() or any(isinstance(f, RepoFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, RepoFinder())
    return True


ACTIVATED = activate()
