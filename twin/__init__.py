"""emtwin's instrument twin and dataset factory: recipes, profiles, HDF5 datasets, the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emtwin")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
