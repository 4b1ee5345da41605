"""pdseg-qupath: PathSegDiff tissue segmentation in the QuPath annotate → train → predict loop.

The few names a Python user needs::

    from pdseg_qupath import open_source, train, predict, evaluate, load_model, load_backbone

    with open_source("project.qpproj") as src:            # or a folder of images + <name>.geojson
        result = train(src, "my-model", mpp=0.5)
    with open_source("project.qpproj", writable=True) as src:
        predict(src, "my-model")                           # classed pdseg annotations, written back

They are imported on first use, so ``import pdseg_qupath`` stays light (no torch, no QuPath).
"""

import os as _os
from importlib import import_module as _import_module

__version__ = "0.1.0"

# OpenMP threads that spin while waiting made torch up to 75x slower whenever other processes shared the
# cores (docs/PERFORMANCE.md). Passive waiting costs nothing on an idle machine; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_PUBLIC = {
    "open_source": "pdseg_qupath.sources.inputs",
    "load_backbone": "pdseg_qupath.backbone.spec",
    "load_model": "pdseg_qupath.learn.modelio",
    "train": "pdseg_qupath.tasks.train",
    "predict": "pdseg_qupath.tasks.predict",
    "evaluate": "pdseg_qupath.tasks.evaluate",
    "PdsegError": "pdseg_qupath.core.errors",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pdseg_qupath' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
