"""MTCNN face detection (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks"), with facenet-pytorch's defaults, so that crops match the ones its scorer saw.

Three networks run as a cascade on a uint8 image:

1. **P-Net**, fully convolutional, slides a 12x12 window (stride 2) over an image pyramid (each level
   ``factor`` = 0.709 of the last, the first scaled so that ``min_face_size`` pixels become 12) and proposes
   boxes whose face probability is at least ``thresholds[0]``;
2. **R-Net** rescores each proposal on a 24x24 crop and regresses its box;
3. **O-Net** does the same on a 48x48 crop and adds five landmarks.

Non-maximum suppression (NMS) runs within each pyramid level, across levels and after each net; boxes are
made square before each crop. The layer names follow facenet-pytorch's, so its ``pnet.pt``, ``rnet.pt`` and
``onet.pt`` load with ``strict=True``; the cascade is written here from the paper and those weights' layout.

Example:
    >>> det = MTCNN()                                  # random weights here; see w2wlib.facenet.load_face_scorer
    >>> boxes, probs, points = det.detect(np.zeros((1, 64, 64, 3), np.uint8))[0]
    >>> boxes.shape[1:], points.shape[1:]
    (torch.Size([4]), torch.Size([5, 2]))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PNet", "RNet", "ONet", "MTCNN", "nms"]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 255] -> the nets' input scale, (x - 127.5) / 128."""
    return (x - 127.5) * 0.0078125


class PNet(nn.Module):
    """Proposal net, fully convolutional: ``[N, 3, H, W]`` -> box offsets ``[N, 4, H', W']``, face
    probabilities ``[N, 2, H', W']``, with ``H' = ceil((H - 2) / 2) - 4`` (one cell per 12x12 window, stride 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)          # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)          # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        h = self.prelu3(self.conv3(self.prelu2(self.conv2(h))))
        return self.conv4_2(h), self.conv4_1(h).softmax(1)


def _flatten_whc(h: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, W*H*C]`` in (W, H, C) order: the dense layers were trained in TensorFlow on a
    transposed layout, and the converted weights expect this order."""
    return h.permute(0, 3, 2, 1).reshape(len(h), -1)


class RNet(nn.Module):
    """Refinement net: 24x24 crops ``[N, 3, 24, 24]`` -> box offsets ``[N, 4]``, face probabilities ``[N, 2]``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)       # 22 -> pool 11
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)      # 9 -> pool 4
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)      # 3: 64 * 3 * 3 = 576
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        h = F.max_pool2d(self.prelu2(self.conv2(h)), 3, 2, ceil_mode=True)
        h = self.prelu4(self.dense4(_flatten_whc(self.prelu3(self.conv3(h)))))
        return self.dense5_2(h), self.dense5_1(h).softmax(1)


class ONet(nn.Module):
    """Output net: 48x48 crops ``[N, 3, 48, 48]`` -> box offsets ``[N, 4]``, landmarks ``[N, 10]`` (five x
    then five y, as fractions of the box), face probabilities ``[N, 2]``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)       # 46 -> pool 23
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)      # 21 -> pool 10
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)      # 8 -> pool 4
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)    # 3: 128 * 3 * 3 = 1152
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        h = F.max_pool2d(self.prelu2(self.conv2(h)), 3, 2, ceil_mode=True)
        h = F.max_pool2d(self.prelu3(self.conv3(h)), 2, 2, ceil_mode=True)
        h = self.prelu5(self.dense5(_flatten_whc(self.prelu4(self.conv4(h)))))
        return self.dense6_2(h), self.dense6_3(h), self.dense6_1(h).softmax(1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
        overlap: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression within each group: indices of the kept boxes, best score first.

    ``boxes`` ``[K, 4]`` are ``(x1, y1, x2, y2)``; a box is dropped when it overlaps a better-scoring kept box
    of its group by more than ``threshold``. ``overlap="union"`` is intersection over union with areas
    ``(x2 - x1) * (y2 - y1)``; ``"min"`` is intersection over the smaller box with areas ``(x2 - x1 + 1) *
    (y2 - y1 + 1)`` (pixel-inclusive), as MTCNN's last stage uses.

    Example:
        >>> b = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
        >>> nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), 0.5).tolist()
        [0, 2]
    """
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    one = 1.0 if overlap == "min" else 0.0
    # shift each group far from the others, so one pass never suppresses across groups
    span = float(boxes.max() - boxes.min()) + 2.0
    b = boxes + (groups.to(boxes) * span)[:, None]
    area = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    order = scores.argsort(descending=True)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        lo = torch.maximum(b[i, :2], b[rest, :2])                       # [R, 2]
        hi = torch.minimum(b[i, 2:], b[rest, 2:])
        inter = (hi - lo + one).clamp(min=0).prod(1)                    # [R]
        denom = torch.minimum(area[i], area[rest]) if overlap == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return torch.stack(keep)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes ``[K, 4]`` -> squares of side ``max(w, h)`` about the same centre."""
    wh = boxes[:, 2:] - boxes[:, :2]                                    # [K, 2]
    side = wh.max(1, keepdim=True).values
    lo = boxes[:, :2] + (wh - side) / 2
    return torch.cat([lo, lo + side], 1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply R-/O-Net offsets ``[K, 4]``, in units of the pixel-inclusive box size."""
    wh = boxes[:, 2:] - boxes[:, :2] + 1
    return boxes + offsets * wh.repeat(1, 2)


def _crops(images: torch.Tensor, boxes: torch.Tensor, groups: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``boxes`` (clipped to the image, 1-based inclusive) resized to ``size`` (area): ``[K, 3, s, s]``."""
    h, w = images.shape[2:]
    b = boxes.trunc().long().tolist()
    out = []
    for (x1, y1, x2, y2), g in zip(b, groups.tolist()):
        x1, y1, x2, y2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        out.append(F.interpolate(images[g:g + 1, :, y1 - 1:y2, x1 - 1:x2], size=(size, size), mode="area"))
    return torch.cat(out)


def _inside(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Boxes that keep at least one pixel once clipped to the image (the others cannot be cropped)."""
    b = boxes.trunc()
    return (b[:, 2].clamp(max=w) >= b[:, 0].clamp(min=1)) & (b[:, 3].clamp(max=h) >= b[:, 1].clamp(min=1))


class MTCNN(nn.Module):
    """The three-stage detector: uint8 images ``[N, H, W, 3]`` -> per image, boxes, probabilities, landmarks.

    Defaults are facenet-pytorch's (``min_face_size=20``, ``thresholds=(0.6, 0.7, 0.7)``, ``factor=0.709``),
    the settings under which w2w++'s baseline scored its ID of 0.557.
    """

    def __init__(self, *, min_face_size: int = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709):
        super().__init__()
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()

    def _scales(self, h: int, w: int) -> list[float]:
        """The pyramid: the first level maps ``min_face_size`` to P-Net's 12 pixels; stop below 12 pixels."""
        scale = 12.0 / self.min_face_size
        side, scales = min(h, w) * scale, []
        while side >= 12:
            scales.append(scale)
            scale, side = scale * self.factor, side * self.factor
        return scales

    def _propose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1 on ``[N, 3, H, W]`` pixels: squared boxes ``[K, 4]``, their image index ``[K]``, scores ``[K]``."""
        n, _, h, w = x.shape
        found = []
        for s in self._scales(h, w):
            reg, prob = self.pnet(_normalise(F.interpolate(x, size=(int(h * s + 1), int(w * s + 1)), mode="area")))
            hit = prob[:, 1] >= self.thresholds[0]                       # [N, H', W']
            img, row, col = hit.nonzero(as_tuple=True)
            xy = torch.stack([col, row], 1).to(x.dtype)                  # window's top-left cell, (x, y)
            boxes = torch.cat([((2 * xy + 1) / s).floor(), ((2 * xy + 12) / s).floor()], 1)   # [K, 4]
            score, offs = prob[img, 1, row, col], reg[img, :, row, col]  # [K], [K, 4]
            keep = nms(boxes, score, img, 0.5)
            found.append((boxes[keep], img[keep], score[keep], offs[keep]))
        if not found:
            empty = x.new_zeros(0, 4)
            return empty, torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
        boxes, img, score, offs = (torch.cat(t) for t in zip(*found))
        keep = nms(boxes, score, img, 0.7)
        boxes, img, score, offs = boxes[keep], img[keep], score[keep], offs[keep]
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)                  # P-Net's offsets: exclusive size
        return _square(boxes + offs * wh), img, score

    @torch.no_grad()
    def detect(self, images) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each uint8 image ``[N, H, W, 3]``: ``(boxes [K, 4], probabilities [K], landmarks [K, 5, 2])``
        on the CPU, largest box first; ``K = 0`` where no face was found. Boxes are ``(x1, y1, x2, y2)`` pixels."""
        dev = next(self.parameters()).device
        x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, np.uint8))   # a copy
        x = x.to(dev).permute(0, 3, 1, 2).float()                        # [N, 3, H, W], 0..255
        n, _, h, w = x.shape
        boxes, img, score = self._propose(x)
        points = x.new_zeros(0, 5, 2)
        ok = _inside(boxes, h, w)
        boxes, img, score = boxes[ok], img[ok], score[ok]
        if len(boxes):                                                   # stage 2: R-Net on 24x24
            reg, prob = self.rnet(_normalise(_crops(x, boxes, img, 24)))
            ok = prob[:, 1] > self.thresholds[1]
            boxes, img, score, reg = boxes[ok], img[ok], prob[ok, 1], reg[ok]
            keep = nms(boxes, score, img, 0.7)
            boxes, img, score = _square(_regress(boxes[keep], reg[keep])), img[keep], score[keep]
            ok = _inside(boxes, h, w)
            boxes, img, score = boxes[ok], img[ok], score[ok]
        if len(boxes):                                                   # stage 3: O-Net on 48x48
            reg, marks, prob = self.onet(_normalise(_crops(x, boxes, img, 48)))
            ok = prob[:, 1] > self.thresholds[2]
            boxes, img, score, reg, marks = boxes[ok], img[ok], prob[ok, 1], reg[ok], marks[ok]
            wh = boxes[:, 2:] - boxes[:, :2] + 1                         # [K, 2]
            points = torch.stack([wh[:, :1] * marks[:, :5] + boxes[:, :1] - 1,
                                  wh[:, 1:] * marks[:, 5:] + boxes[:, 1:2] - 1], 2)   # [K, 5, 2]
            boxes = _regress(boxes, reg)
            keep = nms(boxes, score, img, 0.7, overlap="min")
            boxes, img, score, points = boxes[keep], img[keep], score[keep], points[keep]
        out = []
        for i in range(n):
            mine = img == i
            b, p, m = boxes[mine].cpu(), score[mine].cpu(), points[mine].cpu()
            order = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argsort(descending=True)
            out.append((b[order], p[order], m[order]))
        return out
