"""Fetching the public weights2weights files from the Hugging Face hub (or a local copy of the repo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import ArtifactMissingError, W2WError
from .formats import W2W_FILES, W2W_REPO, _hub_path, logger

def download_w2w(local_dir: str | os.PathLike, *, files: Sequence[str] = (
        "mean.pt", "std.pt", "V.pt", "weight_dimensions.pt", "adapter_config.json"),
        include_all_weights: bool = False, repo_id: str = W2W_REPO, revision: str | None = None) -> Path:
    """Fetch w2w's public files into ``local_dir`` in the hub arrangement; returns ``local_dir``.

    ``files`` are names under ``files/`` (add ``"identity_df.pt"`` or ``"proj_1000pc.pt"`` as needed);
    ``include_all_weights`` adds the 26 GB ``weights_datasets/identities/all_weights.pt``. ``repo_id``
    may be a local folder holding a copy of the repo (then files are copied from it, no network).

    >>> ds = open_weights(download_w2w("w2w", include_all_weights=True))    # doctest: +SKIP
    """
    local_dir = Path(local_dir)
    patterns = [_hub_path(f) for f in files]
    if include_all_weights:
        patterns.append(_hub_path(W2W_FILES["weights"]))
        logger.info("Downloading all_weights.pt (about 26 GB) from %s", repo_id)
    if Path(repo_id).is_dir():
        for p in patterns:
            src, dst = Path(repo_id) / p, local_dir / p
            if not src.is_file():
                raise ArtifactMissingError(f"{src} is missing from the local copy of the w2w repo {repo_id}.")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    else:
        import huggingface_hub

        try:
            huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_dir=str(local_dir),
                                              revision=revision)
        except Exception as err:  # offline, unknown repo, auth: say what to do
            raise W2WError(f"Could not download {patterns} from {repo_id} ({type(err).__name__}: {err}). "
                           f"Check the network (HF_HUB_OFFLINE must be unset), or download the files on "
                           f"another machine and pass repo_id=<that folder>.") from err
    missing = [p for p in patterns if not (local_dir / p).is_file()]
    if missing:
        raise ArtifactMissingError(f"{repo_id} did not provide {missing}: check the file names.")
    return local_dir
