"""The ID scorer for real photos: MTCNN face crops embedded by FaceNet (VGGFace2), compared by cosine.

This is the scorer of w2w++'s baseline (its mean ID 0.557 over 100 FFHQ images), as facenet-pytorch runs it
by default: MTCNN finds the faces (largest first), the box, without margin, is cropped from the photo and
resized to 160x160 (PIL, bilinear), the crop is standardised as ``(x - 127.5) / 128`` and embedded.

:class:`FaceScorer` has the interface of the mini world's identity encoder, so every metric of
:mod:`w2wlib.metrics` takes either: ``embed(images)`` maps uint8 ``[N, H, W, 3]`` (or float ``[N, 3, H, W]``
in [-1, 1]) to unit-norm float32 ``[N, 512]`` on the CPU. A photo in which MTCNN finds no face is an error
that names it: scoring it as a stranger would silently lower every mean.

Example:
    >>> scorer = load_face_scorer("cuda")              # downloads 110 MB on first use  # doctest: +SKIP
    >>> from w2wlib.metrics import identity_scores
    >>> identity_scores(scorer, generated, photos, n_images=8, n_renders=1)          # doctest: +SKIP
    >>> FaceScorer(align=False).embed(np.zeros((2, 160, 160, 3), np.uint8)).shape    # random weights
    torch.Size([2, 512])
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..errors import W2WError
from .inception import EMBED_DIM, InceptionResnetV1
from .mtcnn import MTCNN
from .weights import facenet_file, load_weights, mtcnn_files

__all__ = ["FaceScorer", "load_face_scorer", "CROP", "MIN_SIZE"]

CROP = 160           # FaceNet's input side
MIN_SIZE = 64        # smallest photo side accepted: below it, a face is blown up more than 2.5x to 160


def _check_images(images) -> np.ndarray:
    """The input rules of every image model here (:func:`w2wlib.images.check_image_batch`), at least
    ``MIN_SIZE`` a side -> uint8 numpy ``[N, H, W, 3]`` (MTCNN and the crops work on uint8 photos)."""
    from ..images import check_image_batch
    from ..viz import to_uint8

    images = check_image_batch(images, min_size=MIN_SIZE, model="face scorer",
                               size_fix=f"minimum: pass the photos at their full resolution (faces are found and "
                                        f"cropped to {CROP}x{CROP} by the scorer)")
    if torch.is_tensor(images):
        images = images.cpu().numpy() if images.dtype == torch.uint8 else to_uint8(images)
    return images


def crop_face(image: np.ndarray, box) -> np.ndarray:
    """Cut ``box`` ``(x1, y1, x2, y2)`` (clipped to the image, truncated to whole pixels) from a uint8
    ``[H, W, 3]`` photo and resize it to ``[160, 160, 3]`` with PIL's bilinear filter, as facenet-pytorch does.

    Example:
        >>> crop_face(np.zeros((200, 300, 3), np.uint8), (10.7, 20.2, 110.9, 120.5)).shape
        (160, 160, 3)
    """
    from PIL import Image

    h, w = image.shape[:2]
    x1, y1 = int(max(box[0], 0)), int(max(box[1], 0))
    x2, y2 = int(min(box[2], w)), int(min(box[3], h))
    if x2 <= x1 or y2 <= y1:
        raise W2WError(f"box {tuple(float(b) for b in box)} has no pixel inside the {w}x{h} image")
    face = Image.fromarray(image).crop((x1, y1, x2, y2)).resize((CROP, CROP), Image.Resampling.BILINEAR)
    return np.array(face)


def standardise(faces: np.ndarray) -> torch.Tensor:
    """uint8 crops ``[N, 160, 160, 3]`` -> float32 ``[N, 3, 160, 160]``, ``(x - 127.5) / 128`` (facenet's
    "fixed image standardisation", which the VGGFace2 weights were trained with)."""
    x = torch.from_numpy(np.array(faces, np.uint8)).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 128.0


def _centre_square(h: int, w: int) -> tuple[int, int, int, int]:
    side = min(h, w)
    x1, y1 = (w - side) // 2, (h - side) // 2
    return x1, y1, x1 + side, y1 + side


class FaceScorer(nn.Module):
    """MTCNN + FaceNet behind the identity-encoder interface: ``embed(images)`` -> unit ``[N, 512]``.

    ``align=False`` skips detection and embeds the centre square of each image: for photos that are already
    face crops, and for dry runs on random weights, whose detector finds nothing meaningful. Scores are then
    not comparable with w2w++'s 0.557, which used MTCNN crops.

    Example:
        >>> s = FaceScorer(align=False)                   # random weights; load_face_scorer() loads them
        >>> s.faces(np.zeros((1, 200, 100, 3), np.uint8)).shape
        (1, 160, 160, 3)
    """

    embed_dim = EMBED_DIM

    def __init__(self, *, detector: MTCNN | None = None, net: InceptionResnetV1 | None = None, align: bool = True):
        super().__init__()
        self.mtcnn = detector if detector is not None else MTCNN()
        self.net = net if net is not None else InceptionResnetV1()
        self.align = align
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def boxes(self, images, batch: int = 64) -> list[tuple[float, float, float, float]]:
        """One face box ``(x1, y1, x2, y2)`` per image: MTCNN's largest (or the centre square, ``align=False``),
        detected ``batch`` images at a time.

        Raises W2WError naming every image in which no face was found.
        """
        images = _check_images(images)
        if not self.align:
            return [_centre_square(*images.shape[1:3])] * len(images)
        found = [d for i in range(0, len(images), batch) for d in self.mtcnn.detect(images[i:i + batch])]
        h, w = images.shape[1:3]
        out, missing = [], []
        for i, (b, _, _) in enumerate(found):
            inside = b[(b[:, 2].clamp(max=w) >= b[:, 0].clamp(min=0) + 1) &
                       (b[:, 3].clamp(max=h) >= b[:, 1].clamp(min=0) + 1)]
            if len(inside):
                out.append(tuple(float(v) for v in inside[0]))
            else:
                missing.append(i)
        if missing:
            raise W2WError(
                f"no face found in {len(missing)} of {len(images)} images (index {missing[:10]}"
                f"{', ...' if len(missing) > 10 else ''}): MTCNN needs a face at least "
                f"{self.mtcnn.min_face_size} px wide, upright and unoccluded. Drop or replace those images "
                f"(a generated image without a face is a failure of the model, worth counting on its own), "
                f"or pass align=False if the images are already face crops")
        return out

    def faces(self, images, batch: int = 64) -> np.ndarray:
        """The crops the network sees: uint8 ``[N, 160, 160, 3]``."""
        images = _check_images(images)
        boxes = self.boxes(images, batch)
        if not len(images):
            return np.zeros((0, CROP, CROP, 3), np.uint8)
        return np.stack([crop_face(img, box) for img, box in zip(images, boxes)])

    @torch.no_grad()
    def embed(self, images, batch: int = 64) -> torch.Tensor:
        """Unit-norm embeddings ``[N, 512]`` (float32, CPU) of uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]``
        in [-1, 1] photos; W2WError if one has no face (its index is named)."""
        faces = self.faces(images, batch)                                # [N, 160, 160, 3]
        was_training = self.training
        self.eval()                                                      # BN statistics, no dropout
        try:
            outs = [self.net(standardise(faces[i:i + batch]).to(self.device)).float().cpu()
                    for i in range(0, len(faces), batch)]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.zeros(0, EMBED_DIM)


def load_face_scorer(device: str | torch.device = "cpu", *, pretrained: bool = True, align: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> FaceScorer:
    """The face scorer with facenet-pytorch's published weights (downloaded into ``cache_dir`` on first use,
    see :mod:`w2wlib.facenet.weights`), in eval mode on ``device``. ``pretrained=False``: random weights.

    Example:
        >>> scorer = load_face_scorer(pretrained=False, align=False)
        >>> scorer.embed(np.full((1, 64, 64, 3), 128, np.uint8)).norm(dim=1).round(decimals=4).tolist()
        [1.0]
    """
    scorer = FaceScorer(align=align)
    if pretrained:
        files = mtcnn_files(cache_dir)
        for name in ("pnet", "rnet", "onet"):
            load_weights(getattr(scorer.mtcnn, name), files[name])
        load_weights(scorer.net, facenet_file(cache_dir))
    return scorer.to(device).eval()
