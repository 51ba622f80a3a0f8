"""The RRM pipeline's optional dependencies (the ``rrm`` extra), checked up front with one message
that says what to install, instead of an ImportError from deep inside a run; and the scripts' shared
argument type."""

from __future__ import annotations

import importlib.util

#: import name -> package name
PIPELINE = {"PIL": "pillow", "skimage": "scikit-image", "matplotlib": "matplotlib", "tqdm": "tqdm", "scipy": "scipy"}


def require(*modules: str) -> None:
    """Raise ImportError naming every missing module of ``modules`` (import names) and the command
    that installs them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pkgs = " ".join(PIPELINE.get(m, m) for m in missing)
        raise ImportError(
            f"the RRM pipeline needs {', '.join(missing)}: pip install 'rrm_cuda[rrm]' (from a checkout: "
            f"pip install '.[rrm]'), or pip install {pkgs}"
        )


def positive_int(text: str) -> int:
    """argparse type of the scripts' counts (``--limit``): an int >= 1, else a usage error that names
    the value (``--limit 0`` evaluated no image and reported an mIoU of nan)."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {v}")
    return v
