"""pdseg-qupath: PathSegDiff segmentation for QuPath users."""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting made torch up to 75x slower whenever other processes shared the
# cores (docs/PERFORMANCE.md). Passive waiting costs nothing on an idle machine; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
