"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class PdsegError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class MissingPixelSizeError(PdsegError):
    """An image records no pixel size in µm, and none was given with --image-mpp."""

    def __init__(self, image: str) -> None:
        super().__init__(
            f"{image}: the image records no pixel size in µm. "
            "Pass its resolution with --image-mpp (for example --image-mpp 0.5 for 20x)."
        )
