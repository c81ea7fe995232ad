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
import torch

from .errors import W2WError

__all__ = ["load_images", "load_people", "check_image_batch"]

_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

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


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)


def load_people(folder: str | os.PathLike, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Photos of people to invert, from a folder: ``(inputs [G, size, size, 3], references [G * m, ...], names)``.

    - **A folder of images**: one person each, named by the file; each photo is also its own reference
      (``m = 1``), so an inversion is scored against the photo it saw.
    - **A folder of folders**: one person each, named by the folder; its first image (by file name) is the
      input, the next ``m`` images are references that no inversion sees, ``m`` being the fewest any person has
      beyond the input. Each person needs at least two images.

    Every image goes through :func:`load_images` (converted where safe, refused where not).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise W2WError(f"{folder} is not a folder: give a folder of face photos (one per person), or a folder with "
                       f"one folder of photos per person")
    people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        files = _image_files(folder)
        if not files:
            raise W2WError(f"{folder} holds no images ({', '.join(_SUFFIXES)}) and no folders of them")
        inputs = load_images(files, size)
        return inputs, inputs.copy(), [p.stem for p in files]
    files = {p.name: _image_files(p) for p in people}
    short = [name for name, f in files.items() if len(f) < 2]
    if short:
        raise W2WError(f"{len(short)} person folder(s) in {folder} hold fewer than 2 images ({', '.join(short[:5])}): "
                       f"each needs an input photo and at least one reference photo")
    m = min(len(f) for f in files.values()) - 1
    inputs = load_images([f[0] for f in files.values()], size)
    refs = load_images([p for f in files.values() for p in f[1:1 + m]], size)
    return inputs, refs, list(files)


_RANGE_TOL = 1e-3            # float images may overshoot [-1, 1] by rounding, by no more than this


def check_image_batch(images, *, min_size: int, model: str, size_fix: str) -> np.ndarray | torch.Tensor:
    """The input rules of every image model here (the mini identity encoder, the face scorer): uint8
    ``[N, H, W, 3]`` (numpy, torch, or a list of ``[H, W, 3]``) or float torch ``[N, 3, H, W]`` in [-1, 1],
    at least ``min_size`` pixels a side. Returns the numpy or torch batch, detached; raises W2WError with
    the fix otherwise (``model`` names the model in the message, ``size_fix`` says what to pass instead).

    Float images must be finite and in [-1, 1]; a float batch with no negative value at all is taken for
    [0, 1] images (no face image in [-1, 1] lacks every pixel darker than mid-grey) and refused.

    >>> check_image_batch(np.zeros((2, 64, 64, 3), np.uint8), min_size=64, model="encoder", size_fix="").shape
    (2, 64, 64, 3)
    """
    if isinstance(images, (list, tuple)):
        images = (np.stack([np.asarray(i) for i in images]) if images
                  else np.zeros((0, min_size, min_size, 3), np.uint8))
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise W2WError(f"numpy images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}; "
                           f"w2wlib.viz.to_uint8 converts other formats")
        _check_size(images.shape[1:3], min_size, model, size_fix)
        return images
    if not torch.is_tensor(images):
        raise W2WError(f"expected uint8 numpy [N, H, W, 3] or float torch [N, 3, H, W], "
                       f"got {type(images).__name__}")
    ok_u8 = images.dtype == torch.uint8 and images.ndim == 4 and images.shape[-1] == 3
    ok_float = images.is_floating_point() and images.ndim == 4 and images.shape[1] == 3
    if not (ok_u8 or ok_float):
        raise W2WError(f"torch images must be float [N, 3, H, W] in [-1, 1] (or uint8 "
                       f"[N, H, W, 3]), got {images.dtype} {tuple(images.shape)}")
    _check_size(tuple(images.shape[1:3] if ok_u8 else images.shape[2:]), min_size, model, size_fix)
    if ok_float and images.numel():
        _check_float_range(images.detach())
    return images.detach()


def _check_size(hw: tuple[int, int], min_size: int, model: str, size_fix: str) -> None:
    if min(hw) < min_size:
        raise W2WError(f"images are {hw[0]}x{hw[1]} pixels, smaller than the {model}'s {min_size}x{min_size} "
                       f"{size_fix}")


def _check_float_range(x: torch.Tensor) -> None:
    """Float images must be finite and in [-1, 1]; [0, 1] and [0, 255] inputs would ruin every score."""
    finite = torch.isfinite(x)
    if not finite.all():
        bad = torch.nonzero(~finite.flatten(1).all(1)).flatten()
        raise W2WError(f"{bad.numel()} image(s) have NaN/inf pixels (first at index {bad[:5].tolist()}): "
                       f"drop or regenerate them before embedding")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        fix = ("it looks like [0, 255]: pass x / 127.5 - 1, or the uint8 [N, H, W, 3] images themselves"
               if hi > 2 else "clamp them with x.clamp(-1, 1) if the overshoot is expected")
        raise W2WError(f"float images must be in [-1, 1], but these span [{lo:.4g}, {hi:.4g}]: {fix}")
    if lo >= 0 and hi > 0:
        raise W2WError(f"float images must be in [-1, 1], but these span [{lo:.4g}, {hi:.4g}] with no "
                       f"negative value, which is the [0, 1] convention: pass x * 2 - 1, or uint8 "
                       f"[N, H, W, 3] images (w2wlib.viz.to_uint8), which are never ambiguous")
