"""The published weights of the face scorer: found in a cache, or downloaded there on first use.

* FaceNet (Inception-ResNet-v1, VGGFace2): facenet-pytorch's release file ``20180402-114759-vggface2.pt``
  (about 107 MB), from its GitHub release, as ``facenet_pytorch.InceptionResnetV1(pretrained="vggface2")``
  fetches it. A copy already in facenet-pytorch's own cache (``$TORCH_HOME/checkpoints``) is used as is.
* MTCNN: ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (2 MB), which facenet-pytorch ships inside its package. They
  are taken from the facenet-pytorch 2.6.0 wheel, fetched with ``pip download --no-deps`` from the package
  index pip is set up with (an immutable file, checked by its SHA-256), so that they need no facenet-pytorch
  install: that package pins torch < 2.3.

The cache is ``torch.hub.get_dir()/checkpoints`` (``~/.cache/torch/hub/checkpoints``; ``$TORCH_HOME`` moves
it), where torchvision and timm keep theirs. ``HF_HUB_OFFLINE=1`` means no download is tried.

Example:
    >>> from w2wlib.facenet import InceptionResnetV1
    >>> net = load_weights(InceptionResnetV1(), facenet_file())          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import W2WError

__all__ = ["default_cache_dir", "facenet_file", "mtcnn_files", "load_weights", "FACENET_URL"]

log = logging.getLogger(__name__)

FACENET_NAME = "20180402-114759-vggface2.pt"
FACENET_URL = f"https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/{FACENET_NAME}"
_WHEEL = "facenet_pytorch-2.6.0-py3-none-any.whl"
_WHEEL_PIN = "facenet-pytorch==2.6.0"
_WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
_MTCNN_NAMES = ("pnet.pt", "rnet.pt", "onet.pt")   # in the wheel under facenet_pytorch/data/
_MTCNN_DIR = "facenet-mtcnn"           # under the cache: the three MTCNN files
_MTCNN_BY_HAND = "https://github.com/timesler/facenet-pytorch/tree/master/data"


def default_cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where the scorer's weights are kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _facenet_pytorch_cache() -> Path:
    """Where facenet-pytorch itself caches the FaceNet file: ``$TORCH_HOME/checkpoints``."""
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "checkpoints"


def _offline() -> bool:
    return os.getenv("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(url: str, dst: Path, sha256: str | None, fix: str) -> None:
    """Download ``url`` to ``dst`` (checked against ``sha256`` when given), or raise W2WError ending in ``fix``."""
    if _offline():
        raise W2WError(f"{dst.name} is not in the cache and HF_HUB_OFFLINE is set, so it is not downloaded: {fix}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, dst)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256, progress=True)
    except Exception as err:  # offline, proxy, a changed file: say where the file goes
        raise W2WError(f"could not download {url} ({type(err).__name__}: {err}): {fix}") from err


def _pip_download(folder: Path, fix: str) -> Path:
    """facenet-pytorch's 2.6.0 wheel in ``folder``, fetched by pip (no dependencies, no install) and checked
    against its SHA-256; or a W2WError ending in ``fix``."""
    from ..stages import sha256

    if _offline():
        raise W2WError(f"the MTCNN weights are not in the cache and HF_HUB_OFFLINE is set, so they are not "
                       f"downloaded: {fix}")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(folder), _WHEEL_PIN]
    log.info("Fetching the MTCNN weights: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = folder / _WHEEL
    if done.returncode or not wheel.is_file():
        raise W2WError(f"`pip download {_WHEEL_PIN}` failed ({(done.stderr or done.stdout).strip()[-300:]}): {fix}")
    if sha256(wheel) != _WHEEL_SHA256:
        wheel.unlink()
        raise W2WError(f"the {_WHEEL} that pip fetched has another SHA-256 than the published one: {fix}")
    return wheel


def facenet_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """The FaceNet VGGFace2 state dict: from ``cache_dir`` or facenet-pytorch's cache, else downloaded."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in (cache, _facenet_pytorch_cache()):
        if (folder / FACENET_NAME).is_file():
            return folder / FACENET_NAME
    _download(FACENET_URL, cache / FACENET_NAME, None,
              f"download {FACENET_URL} on a machine with network and put it at {cache / FACENET_NAME}")
    return cache / FACENET_NAME


def mtcnn_files(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{"pnet": path, "rnet": path, "onet": path}``; missing ones are taken from facenet-pytorch's wheel."""
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / _MTCNN_DIR
    paths = {name.removesuffix(".pt"): folder / name for name in _MTCNN_NAMES}
    if all(p.is_file() for p in paths.values()):
        return paths
    wheel = _pip_download(folder, f"download pnet.pt, rnet.pt and onet.pt from facenet-pytorch's data folder "
                                  f"({_MTCNN_BY_HAND}, or facenet_pytorch/data/ inside the wheel that "
                                  f"`pip download --no-deps {_WHEEL_PIN}` fetches) and put them in {folder}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name, path in zip(_MTCNN_NAMES, paths.values()):
                with zf.open(f"facenet_pytorch/data/{name}") as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as err:
        raise W2WError(f"{wheel} is not the facenet-pytorch 2.6.0 wheel ({err}): delete it and run again") from err
    finally:
        wheel.unlink(missing_ok=True)
    return paths


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a published state dict into ``module`` with ``strict=True``; a wrong file raises W2WError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, KeyError) as err:
        raise W2WError(f"{path} is not the {type(module).__name__} weights this scorer expects ({err}); it may "
                       f"be damaged or cut short: delete it and run again to download it") from err
    return module
