"""Figures and widgets for the book.

``show_images`` draws a captioned grid of images with matplotlib. ``image_slider`` makes an ipywidget
that steps through frames (an interpolation, a sweep along a direction). It is linked in the browser
(``jslink``), not through a kernel callback, so it keeps working in the static HTML book.

Example:
    >>> import numpy as np
    >>> frames = [np.zeros((8, 8, 3), np.uint8) for _ in range(3)]
    >>> box = image_slider(frames, description="step")
    >>> len(box.children)
    2
"""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np

from .errors import W2WError

__all__ = ["to_uint8", "to_tensor", "image_grid", "show_images", "png_bytes", "image_slider", "markdown_table"]


def to_uint8(images) -> np.ndarray:
    """Images as uint8 ``[N, H, W, 3]`` from uint8 arrays, floats in [0, 1], or torch ``[N, 3, H, W]`` in [-1, 1]."""
    if hasattr(images, "detach"):  # a torch tensor, channels first, in [-1, 1] as diffusers decodes
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise W2WError(f"expected images of shape [N, H, W, 3], got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def to_tensor(images) -> "torch.Tensor":  # noqa: F821
    """uint8 ``[N, H, W, 3]`` images (numpy or torch) as float32 torch ``[N, 3, H, W]`` in [-1, 1],
    diffusers' image convention; the inverse of :func:`to_uint8`."""
    import torch

    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise W2WError(f"expected uint8 images [N, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def image_grid(images, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``[N, H, W, 3]`` images into one ``[rows*(H+pad), nrow*(W+pad), 3]`` image, row-major."""
    arr = to_uint8(images)
    if len(arr) == 0 or nrow < 1:
        raise W2WError(f"image_grid needs at least one image and nrow >= 1, got {len(arr)} images and nrow={nrow}")
    n, h, w, _ = arr.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def show_images(images, nrow: int, *, title: str | None = None, row_labels: Sequence[str] | None = None,
                col_labels: Sequence[str] | None = None, scale: float = 1.0):
    """Draw images as a grid with optional row/column labels; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    arr = to_uint8(images)
    rows = -(-len(arr) // nrow)
    h, w = arr.shape[1:3]
    fig, axes = plt.subplots(rows, nrow, figsize=(scale * nrow * max(w, 48) / 40, scale * rows * max(h, 48) / 40), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < len(arr):
            ax.imshow(arr[i], interpolation="nearest")
    chars = max(10, int(18 * scale * max(h, 48) / 64))   # a row label wraps to the height of its row
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(textwrap.fill(str(label), chars), fontsize=8)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """One ``[H, W, 3]`` uint8 image as PNG bytes, upscaled by ``scale`` with nearest neighbour."""
    from PIL import Image

    arr = to_uint8(image)[0]
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_slider(frames: Sequence[np.ndarray], *, description: str = "frame", labels: Sequence[str] | None = None,
                 scale: int = 3):
    """A slider over ``frames`` that shows one image at a time; works in the static HTML book.

    The slider's value is linked to a ``Stack`` of image widgets in the browser, so no kernel is needed.
    """
    import ipywidgets as widgets

    if len(frames) < 2:
        raise W2WError(f"image_slider needs at least 2 frames, got {len(frames)}")
    images = [widgets.Image(value=png_bytes(f, scale), format="png") for f in frames]
    stack = widgets.Stack(images, selected_index=0)
    slider = widgets.IntSlider(value=0, min=0, max=len(frames) - 1, description=description, continuous_update=True)
    widgets.jslink((slider, "value"), (stack, "selected_index"))
    if labels is not None:
        if len(labels) != len(frames):
            raise W2WError(f"{len(labels)} labels for {len(frames)} frames")
        caption = widgets.Stack([widgets.Label(str(t)) for t in labels], selected_index=0)
        widgets.jslink((slider, "value"), (caption, "selected_index"))
        return widgets.VBox([widgets.HBox([slider, caption]), stack])
    return widgets.VBox([slider, stack])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], *, digits: int = 3) -> str:
    """A Markdown table (MyST renders it in the book): floats to ``digits`` places, the rest as ``str``.

    Example:
        >>> print(markdown_table(["space", "MSE"], [["PCA", 0.77241]]))
        | space | MSE |
        |---|---|
        | PCA | 0.772 |
    """
    if any(len(r) != len(headers) for r in rows):
        raise W2WError(f"every row needs {len(headers)} cells, one per header; got lengths {sorted({len(r) for r in rows})}")

    def cell(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])
