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


def test_png_and_slider():
    img = np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    assert png_bytes(img, scale=2)[:8] == b"\x89PNG\r\n\x1a\n"
    box = image_slider([img, img[::-1]], description="t", labels=["a", "b"])
    slider = box.children[0].children[0]
    assert slider.max == 1
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
