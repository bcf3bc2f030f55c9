"""Opening a reference image with its size bounded: the header is read first, the pixels only if it is small enough.

A PNG of a few KB can declare 13000 x 13000 pixels and decode to GBs, so
the size a file declares is checked against ``limits.MAX_REFERENCE_PIXELS``
before a single pixel is decoded (``Image.open`` reads the header only).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import UsageError
from .limits import MAX_REFERENCE_PIXELS


def open_reference_image(path: Path, where: str):
    """The image at ``path`` decoded to RGB; a file that is not an image, or declares more than
    ``MAX_REFERENCE_PIXELS``, is a one-line UsageError naming ``where`` (the flag or key) and the file."""
    from PIL import Image

    unreadable = (OSError, ValueError)
    with warnings.catch_warnings():
        # Pillow warns past its own bound, which is above ours: ours refuses such a file below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as err:  # past twice Pillow's bound: it refuses at the header
            raise UsageError(
                f"{where}: image {path} is too large to decode ({err}); "
                f"at most {MAX_REFERENCE_PIXELS} pixels are accepted"
            ) from None
        except unreadable as err:
            raise _cannot_read(path, where, err) from None
        with img:
            check_declared_size(img.size, path, where)
            try:
                img.load()
                return img.convert("RGB")
            except unreadable as err:
                raise _cannot_read(path, where, err) from None


def check_declared_size(size: tuple[int, int], path: Path, where: str) -> None:
    width, height = size
    if width * height > MAX_REFERENCE_PIXELS:
        raise UsageError(
            f"{where}: image {path} declares {width}x{height} pixels; at most {MAX_REFERENCE_PIXELS} pixels "
            "are accepted (8192x8192)"
        )


def _cannot_read(path: Path, where: str, err: BaseException) -> UsageError:
    return UsageError(f"{where}: cannot read image {path} ({err.__class__.__name__}: {err})")
