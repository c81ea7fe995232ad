"""The dataset, both spaces and their identity split, opened together: what every chapter and command starts from.

``w2w spaces build`` fits the PCA and trains the VAE on one split of one weights dataset; this opens
that folder and its dataset as one :class:`Spaces`, with the spaces' standardisation checked against
the dataset's (a space built on another dataset is refused, not silently used).

Example:
    >>> S = open_spaces("data/spaces", "data/dataset")               # doctest: +SKIP
    >>> S.space("vae").decode_weights(z).shape                       # doctest: +SKIP
    torch.Size([1, 5376])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArtifactMissingError, W2WError
from .base import WeightSpace, load_space

__all__ = ["Spaces", "open_spaces", "SPACE_NAMES"]

SPACE_NAMES = ("pca", "vae")


@dataclass
class Spaces:
    """A weights dataset, its PCA and VAE spaces, and the identity split they were fit on."""

    dataset: object                 # w2wlib.data.WeightsDataset
    pca: WeightSpace
    vae: WeightSpace
    train_rows: torch.Tensor        # [N_train] dataset rows the spaces were fit on
    val_rows: torch.Tensor          # [N_val] held out by identity
    folder: Path

    def space(self, name: str) -> WeightSpace:
        """``"pca"`` or ``"vae"``."""
        if name not in SPACE_NAMES:
            raise W2WError(f"unknown space {name!r}: choose pca or vae")
        return getattr(self, name)

    def amortised(self, name: str):
        """The amortised inverter of space ``name`` that ``w2w spaces build`` shipped in ``amortised/<name>``."""
        from ..invert.amortised import AmortisedInverter

        self.space(name)
        folder = self.folder / "amortised" / name
        if not folder.is_dir():
            raise ArtifactMissingError(
                f"{self.folder} has no amortised inverter for the {name} space ({folder} is missing): build it with "
                f"`w2w spaces build --dataset {self.dataset.folder} --out {self.folder}` (it trains one per space "
                f"on datasets of the mini world), or use --method gradient or cmaes")
        return AmortisedInverter.load(folder, device=self.space(name).device)

    @property
    def config(self):
        from .build import SpacesConfig

        return SpacesConfig.from_manifest(self.folder)


def open_spaces(spaces_dir: str | os.PathLike, dataset_dir: str | os.PathLike, *,
                device: torch.device | str = "cpu", pca_k: int | None = None) -> Spaces:
    """Open ``spaces_dir`` (``pca/``, ``vae/``, ``split.json``) and the dataset it was built on.

    ``pca_k``: keep only the PCA's first ``pca_k`` components (w2w samples and edits with 1,000 of the 10,000
    it stores; a profile's ``pca_k``); None, or more than it stores, keeps them all.
    """
    from ..data import open_weights

    folder = Path(spaces_dir)
    for part in ("pca", "vae", "split.json"):
        if not (folder / part).exists():
            raise ArtifactMissingError(f"{folder / part} is missing: build the spaces with "
                                       f"`w2w spaces build --dataset {dataset_dir} --out {folder}`")
    ds = open_weights(dataset_dir)
    pca, vae = load_space(folder / "pca"), load_space(folder / "vae").to(device)
    for name, space in (("pca", pca), ("vae", vae)):
        if space.dim != ds.dim:
            raise W2WError(f"{folder / name} has D={space.dim:,} but {dataset_dir} has D={ds.dim:,}: "
                           f"these spaces were built on another dataset; rebuild them with w2w spaces build")
        if space.mean is None:
            space.set_standardisation(ds.mean, ds.std)
        elif not (torch.allclose(space.mean, ds.mean.float(), atol=1e-6) and torch.allclose(space.std, ds.std.float(), atol=1e-6)):
            raise W2WError(f"{folder / name} was fit with another mean/std than {dataset_dir}'s: the spaces belong "
                           f"to another dataset; rebuild them with w2w spaces build")
    if pca_k is not None and pca_k < pca.latent_dim:
        pca = pca.truncated(int(pca_k))
    split = json.loads((folder / "split.json").read_text())
    return Spaces(ds, pca, vae, torch.tensor(split["train"]), torch.tensor(split["val"]), folder)
