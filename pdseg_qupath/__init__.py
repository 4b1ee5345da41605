"""pdseg-qupath: PathSegDiff segmentation for QuPath users."""

__version__ = "0.1.0"
