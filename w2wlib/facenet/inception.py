"""FaceNet's Inception-ResNet-v1 (Szegedy et al. 2016, "Inception-v4, Inception-ResNet..."), as trained on
VGGFace2 by D. Sandberg's facenet and converted to PyTorch by facenet-pytorch.

The module names follow facenet-pytorch's, so that its published state dicts load with ``strict=True``
(``conv2d_1a.conv.weight``, ``repeat_1.0.branch2.1.bn.running_mean``, ``last_linear.weight``, ...). The
network itself is written here from the published architecture: a stem, 5 x block35 (17x17, 256 ch),
reduction A, 10 x block17 (8x8, 896 ch), reduction B, 5 x block8 (3x3, 1792 ch) and one block8 without
ReLU, average pool, a 1792 -> 512 linear and a batch norm; the embedding is the L2-normalised output.

Example:
    >>> net = InceptionResnetV1().eval()
    >>> net(torch.zeros(2, 3, 160, 160)).shape
    torch.Size([2, 512])
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionResnetV1", "EMBED_DIM", "VGGFACE2_CLASSES"]

EMBED_DIM = 512              # the embedding size of the published models
VGGFACE2_CLASSES = 8631      # identities in VGGFace2's training split: the classifier the weights carry
_BN_EPS = 1e-3               # TensorFlow's batch-norm epsilon, which the converted statistics assume

_K = Union[int, tuple[int, int]]
# one convolution of a branch: (in channels, out channels, kernel, stride, padding)
_Conv = tuple[int, int, _K, int, _K]


class _ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; state-dict keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: _K, stride: int = 1, padding: _K = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.relu = nn.ReLU()


def _branch(convs: Sequence[_Conv]) -> nn.Module:
    """A branch of conv-BN-ReLUs; a branch of one conv is that module itself (``branch0.conv.weight``),
    longer ones are numbered (``branch1.0.conv.weight``), as in the published state dicts."""
    mods = [_ConvBN(*c) for c in convs]
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def _c(cin: int, cout: int, kernel: _K = 1, stride: int = 1, padding: _K = 0) -> _Conv:
    return (cin, cout, kernel, stride, padding)


class _Residual(nn.Module):
    """Inception-ResNet block: parallel branches, concatenated, a 1x1 conv back to ``channels`` (with bias),
    scaled by ``scale`` and added to the input; then ReLU unless ``relu=False``.

    ``[N, C, H, W]`` -> ``[N, C, H, W]``. The residual scaling (0.17, 0.10, 0.20) is the paper's remedy for
    unstable training of wide residual Inception blocks (Szegedy et al. 2016, section 3.3).
    """

    def __init__(self, channels: int, branches: Sequence[Sequence[_Conv]], scale: float, relu: bool = True):
        super().__init__()
        self.scale, self.relu = scale, relu
        for i, convs in enumerate(branches):
            self.add_module(f"branch{i}", _branch(convs))
        self.n_branches = len(branches)
        width = sum(convs[-1][1] for convs in branches)
        self.conv2d = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], 1)
        out = x + self.scale * self.conv2d(h)
        return F.relu(out) if self.relu else out


class _Reduction(nn.Module):
    """Grid reduction (the paper's "Reduction-A/B"): strided conv branches and a 3x3/2 max pool, concatenated."""

    def __init__(self, branches: Sequence[Sequence[_Conv]]):
        super().__init__()
        for i, convs in enumerate(branches):
            self.add_module(f"branch{i}", _branch(convs))
        self.n_branches = len(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [getattr(self, f"branch{i}")(x) for i in range(self.n_branches)]
        return torch.cat(outs + [F.max_pool2d(x, 3, 2)], 1)


def _block35(scale: float = 0.17) -> _Residual:          # 17x17 grid, 256 channels
    return _Residual(256, [[_c(256, 32)],
                           [_c(256, 32), _c(32, 32, 3, 1, 1)],
                           [_c(256, 32), _c(32, 32, 3, 1, 1), _c(32, 32, 3, 1, 1)]], scale)


def _block17(scale: float = 0.10) -> _Residual:          # 8x8 grid, 896 channels; 7x7 factorised
    return _Residual(896, [[_c(896, 128)],
                           [_c(896, 128), _c(128, 128, (1, 7), 1, (0, 3)), _c(128, 128, (7, 1), 1, (3, 0))]], scale)


def _block8(scale: float = 0.20, relu: bool = True) -> _Residual:   # 3x3 grid, 1792 channels
    return _Residual(1792, [[_c(1792, 192)],
                            [_c(1792, 192), _c(192, 192, (1, 3), 1, (0, 1)), _c(192, 192, (3, 1), 1, (1, 0))]],
                     scale, relu)


class InceptionResnetV1(nn.Module):
    """Face images ``[N, 3, 160, 160]``, standardised as ``(x - 127.5) / 128``, -> unit embeddings ``[N, 512]``.

    ``num_classes`` sizes the classifier ``logits`` that the published checkpoints carry (VGGFace2: 8,631
    identities); it is unused by :meth:`forward` but kept so that the file loads with ``strict=True``.
    ``None`` drops it.

    Example:
        >>> net = InceptionResnetV1()
        >>> tuple(net.state_dict()["conv2d_1a.conv.weight"].shape), tuple(net.logits.weight.shape)
        ((32, 3, 3, 3), (8631, 512))
    """

    def __init__(self, *, num_classes: int | None = VGGFACE2_CLASSES, dropout: float = 0.6):
        super().__init__()
        # stem: 160 -> 79 -> 77 -> 77 -> (pool) 38 -> 38 -> 36 -> 17, ending with 256 channels
        self.conv2d_1a = _ConvBN(3, 32, 3, 2)
        self.conv2d_2a = _ConvBN(32, 32, 3, 1)
        self.conv2d_2b = _ConvBN(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, 2)
        self.conv2d_3b = _ConvBN(64, 80, 1)
        self.conv2d_4a = _ConvBN(80, 192, 3, 1)
        self.conv2d_4b = _ConvBN(192, 256, 3, 2)
        self.repeat_1 = nn.Sequential(*[_block35() for _ in range(5)])
        self.mixed_6a = _Reduction([[_c(256, 384, 3, 2)],                                 # 17 -> 8, 896 ch
                                    [_c(256, 192), _c(192, 192, 3, 1, 1), _c(192, 256, 3, 2)]])
        self.repeat_2 = nn.Sequential(*[_block17() for _ in range(10)])
        self.mixed_7a = _Reduction([[_c(896, 256), _c(256, 384, 3, 2)],                  # 8 -> 3, 1792 ch
                                    [_c(896, 256), _c(256, 256, 3, 2)],
                                    [_c(896, 256), _c(256, 256, 3, 1, 1), _c(256, 256, 3, 2)]])
        self.repeat_3 = nn.Sequential(*[_block8() for _ in range(5)])
        self.block8 = _block8(scale=1.0, relu=False)
        self.dropout = nn.Dropout(dropout)          # only active in training; kept for fine-tuning
        self.last_linear = nn.Linear(1792, EMBED_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBED_DIM, eps=_BN_EPS)
        self.logits = nn.Linear(EMBED_DIM, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before normalisation: ``[N, 3, H, W]`` -> ``[N, 512]``."""
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a",
                     "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8"):
            x = getattr(self, name)(x)
        x = self.dropout(x.mean((2, 3)))                                 # [N, 1792], global average pool
        return self.last_bn(self.last_linear(x))                         # [N, 512]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1)                      # [N, 512], unit norm
