"""egovlp-deploy: EgoVLPv2 from training to low-latency inference, as a dual or a fusion encoder."""

import sys as _sys
from pathlib import Path as _Path


def _installed_copy_spec():
    """The import spec of the installed package when this module is the repository's source folder, else None.

    The build maps the checkout's top-level `kernels/`, `export/` and `trainer/` into this package and adds the
    compiled extension `_C`; the source folder has neither. Python started in the checkout root (`python -c`, `-m`,
    a REPL, a notebook) puts the root first on sys.path and finds the source folder before the installed package, so
    the source folder hands the import over to the installed copy, found on the rest of sys.path. With no installed
    copy (a checkout that was never built, or an editable install whose import hook maps the subpackages itself)
    the source folder stays the package.
    """
    here = _Path(__file__).resolve().parent
    if (here / "kernels").is_dir():  # the installed layout
        return None
    from importlib.machinery import PathFinder

    def is_checkout_root(entry: str) -> bool:
        try:
            return _Path(entry or ".").resolve() == here.parent
        except (OSError, RuntimeError):
            return False

    spec = PathFinder.find_spec(__name__, [entry for entry in _sys.path if not is_checkout_root(entry)])
    if spec is None or spec.origin is None:
        return None
    installed = _Path(spec.origin).resolve().parent
    return spec if installed != here and (installed / "kernels").is_dir() else None


_installed = _installed_copy_spec()
if _installed is not None:
    from importlib.util import module_from_spec as _module_from_spec

    # The import statement returns whatever sys.modules holds under this name once this file has run. Edits to the
    # source folder reach this process only through a rebuild (`make setup`) or an editable install.
    _sys.modules[__name__] = _module = _module_from_spec(_installed)
    _installed._initializing = True  # what the import system marks while a module runs (other threads wait)
    try:
        _installed.loader.exec_module(_module)
    finally:
        _installed._initializing = False
else:
    from importlib import metadata as _metadata

    from .checkpoint import CheckpointError
    from .config import ConfigError, EgoVLPv2Config
    from .model import EgoVLPv2, FusionOutput, InputError

    try:  # pyproject.toml holds the version; the installed distribution's metadata carries it here
        __version__ = _metadata.version("egovlp-deploy")
    except _metadata.PackageNotFoundError:  # a checkout that was never installed
        __version__ = "0+unknown"
    __all__ = ["EgoVLPv2", "EgoVLPv2Config", "FusionOutput", "InputError", "CheckpointError", "ConfigError"]
