import io

import numpy as np
import pytest
import torch

from w2wlib import W2WError
from w2wlib.viz import image_grid, image_slider, png_bytes, to_uint8


def test_image_grid_places_each_image():
    imgs = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(5)])
    grid = image_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 6 + 1, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        assert (grid[1 + r * 5: 1 + r * 5 + 4, 1 + c * 6: 1 + c * 6 + 5] == i).all()
    assert (grid[11:15, 7:12] == 255).all()  # the empty sixth cell stays blank
    with pytest.raises(W2WError, match="nrow >= 1"):
        image_grid(imgs, nrow=0)


def test_to_uint8_from_diffusers_tensor():
    t = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = to_uint8(t)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(W2WError, match=r"\[N, H, W, 3\]"):
        to_uint8(np.zeros((2, 3, 4)))


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def upscaled(img: np.ndarray, scale: int) -> np.ndarray:
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def test_png_and_slider(monkeypatch):
    import ipywidgets

    img = np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    data = png_bytes(img, scale=2)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(decode_png(data), upscaled(img, 2))  # lossless
    links = []
    real = ipywidgets.jslink
    monkeypatch.setattr(ipywidgets, "jslink", lambda a, b: links.append((a, b)) or real(a, b))
    frames = [img, img[::-1], 255 - img]
    box = image_slider(frames, description="t", labels=["a", "b", "c"], scale=3)
    (slider, caption), stack = box.children[0].children, box.children[1]
    assert (slider.min, slider.max, slider.value, slider.description) == (0, 2, 0, "t")
    assert len(stack.children) == 3 and stack.selected_index == 0 and caption.selected_index == 0
    for shown, frame in zip(stack.children, frames, strict=True):   # each frame, in order, at 3x
        assert shown.format == "png" and np.array_equal(decode_png(shown.value), upscaled(frame, 3))
    assert [label.value for label in caption.children] == ["a", "b", "c"]
    # the slider drives the frame and its label in the browser (no kernel in the static book)
    assert links == [((slider, "value"), (stack, "selected_index")), ((slider, "value"), (caption, "selected_index"))]
    plain = image_slider(frames[:2])                                  # no labels: the slider, then the frames
    assert plain.children[0].description == "frame" and len(plain.children[1].children) == 2
    with pytest.raises(W2WError, match="at least 2 frames"):
        image_slider([img])
    with pytest.raises(W2WError, match="2 labels for 3 frames"):
        image_slider([img] * 3, labels=["a", "b"])


def test_to_tensor_inverts_to_uint8_exactly():
    from w2wlib.viz import to_tensor

    imgs = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    t = to_tensor(imgs)
    assert t.shape == (3, 3, 5, 7) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(to_uint8(t), imgs)
    with pytest.raises(W2WError, match="uint8 images"):
        to_tensor(imgs.astype(np.float32))


def test_show_images_draws_every_image_and_wraps_long_row_labels():
    """A long label is broken into lines that fit its row, so that labels of neighbouring rows do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    from w2wlib.viz import show_images

    imgs = np.stack([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(4)])
    long = "a young woman with black hair and earrings"
    fig = show_images(imgs, nrow=2, row_labels=["short", long], col_labels=["a", "b"])
    axes = np.array(fig.axes).reshape(2, 2)
    assert [int(ax.images[0].get_array()[0, 0, 0]) for ax in axes.flat] == [0, 40, 80, 120]
    assert axes[0, 0].get_ylabel() == "short"
    lines = axes[1, 0].get_ylabel().split("\n")
    assert len(lines) > 1 and " ".join(lines) == long and max(map(len, lines)) <= 18
