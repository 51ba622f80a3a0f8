"""Train RRM (one-step WSSS). With no argument: the cpu-demo preset (small backbone, embedded data).

Thin entry point of ``rrm_cuda.rrm.train`` (console script ``rrm-train``); run ``--help`` for options.
"""

import os
import sys

try:
    import rrm_cuda  # noqa: F401
except ImportError:  # run from a source checkout built in place: the package is the parent folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rrm_cuda.rrm.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
