"""Reading a user's images for the library: files or arrays in, uint8 ``[N, H, W, 3]`` at one size out.

What is safe to convert is converted, and said in the log: grayscale and palette images become RGB,
an alpha channel is composited on white, and a square image of another size is resized (Lanczos). What
is not safe is refused with the fix: a file that is not an image, a non-square image (crop it to the
face first: a silent crop could cut the face), floats outside [0, 1], NaNs.

Example:
    >>> load_images([np.zeros((64, 64, 3), np.uint8)], size=64).shape
    (1, 64, 64, 3)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import W2WError

__all__ = ["load_images"]

log = logging.getLogger(__name__)


def _to_pil(item: Any, name: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise W2WError(f"{path} is not a file: pass the path of a PNG or JPEG image")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise W2WError(f"{path} is not an image that PIL can read ({e}): save it as PNG or JPEG") from e
        return img
    if isinstance(item, Image.Image):
        return item
    arr = np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)                                   # CHW -> HWC
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise W2WError(f"{name} has shape {arr.shape}: expected an image [H, W], [H, W, 1|3|4] or [1|3|4, H, W]")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise W2WError(f"{name} has dtype {arr.dtype}: pass uint8 in [0, 255] or floats in [0, 1]")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise W2WError(f"{name} has float values in [{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}] (or NaN): "
                           f"floats must lie in [0, 1]; for [-1, 1] images pass (x + 1) / 2")
        arr = (arr * 255).round().astype(np.uint8)
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def load_images(items: Sequence[Any] | Any, size: int) -> np.ndarray:
    """Images (paths, PIL images or arrays) as uint8 ``[N, size, size, 3]``, converted where safe."""
    from PIL import Image

    if isinstance(items, (str, os.PathLike, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim <= 3):
        items = [items]
    if len(items) == 0:
        raise W2WError("no images given: pass at least one image path or array")
    out = []
    for i, item in enumerate(items):
        name = str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}"
        img = _to_pil(item, name)
        if img.mode != "RGB":
            if "A" in img.getbands() or img.mode == "P":
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            log.info("%s: converted from %s to RGB", name, img.mode)
            img = img.convert("RGB")
        w, h = img.size
        if w != h:
            raise W2WError(f"{name} is {w}x{h}, not square: crop it to a square around the face first "
                           f"(the model draws {size}x{size} faces)")
        if w != size:
            log.info("%s: resized from %d to %d pixels", name, w, size)
            img = img.resize((size, size), Image.LANCZOS)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)
