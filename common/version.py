"""The installed fedpath version, recorded in every file fedpath writes."""

from importlib.metadata import PackageNotFoundError, version


def fedpath_version() -> str:
    try:
        return version("fedpath")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
