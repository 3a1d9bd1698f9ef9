"""fasttrain: the fastest honest path from a folder of images to a trained CNN on one GPU."""

__version__ = "0.1.0"

DALI_PACKAGES = ("nvidia-dali-cuda130", "nvidia-dali-cuda120")  # the wheels DALI ships as, newest first


def installed_version(*dists: str) -> str | None:
    """The version of the first of these installed distributions, from its metadata (nothing is
    imported); None when none is installed."""
    import importlib.metadata

    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None
