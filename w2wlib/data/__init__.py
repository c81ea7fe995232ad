"""The weights dataset: N identity LoRAs as an ``[N, D]`` matrix, read memory-mapped.

One class, :class:`WeightsDataset`, reads two on-disk layouts; :func:`open_weights` tells them apart.

**Ours** (written by :func:`save_weights`), one folder:

- ``all_weights.safetensors``: tensor ``"weights"`` ``[N, D]``, float32 or float16 (w2w's ``all_weights.pt``);
- ``mean.safetensors`` / ``std.safetensors``: tensors ``"mean"`` / ``"std"`` ``[D]`` float32, computed in
  float64 over the stored rows, std with Bessel's correction (w2w's ``mean.pt`` / ``std.pt``);
- ``weight_dimensions.json``: ``[[key, [rows, cols]], ...]`` in flat order, peft keys
  ``base_model.model.<module>.lora_A.weight`` (w2w's ``weight_dimensions.pt``);
- ``layout.json``: ``LoraLayout.to_dict()``, with rank and ``lora_alpha`` (w2w's ``adapter_config.json``);
- ``attributes.csv`` (optional): ``identity_seed`` then one 0/1 column per attribute, one row per
  identity in row order (w2w's ``identity_df.pt``, without the pickle);
- ``identities.json``: ``{"format", "version", "dataset_id", "n", "dim", "dtype", "identity_seeds",
  "extra"}``; ``extra`` holds held-out seeds and training hyperparameters.

Every file carries the same ``dataset_id`` (in the safetensors metadata and in ``identities.json``),
a hash of what was saved, so files from two different saves are caught on open, and two saves of the
same data are byte-identical.

**Public w2w** (``Snapchat/weights2weights``, fetched by :func:`download_w2w`), either as on the hub
(``files/*.pt`` and ``weights_datasets/identities/all_weights.pt``) or all in one flat folder:
``all_weights.pt`` ``[64974, 99648]`` float32, ``mean.pt`` / ``std.pt`` ``[99648]``, ``weight_dimensions.pt``
(ordered ``key -> [[numel], shape]``, the flat order) and ``identity_df.pt`` (a pickled pandas DataFrame:
refused unless ``trust_pickles=True``; an ``attributes.csv`` next to it is read instead).

Memory-mapping: ours maps ``all_weights.safetensors`` with ``torch.UntypedStorage.from_file(shared=False)``
(a private, copy-on-write ``mmap``) and views the data region given by the header; the public
file is opened with ``torch.load(weights_only=True, mmap=True)``. Pages are read only when rows are
touched, so opening a 26 GB file is instant, and writing to ``ds.weights`` never reaches the file.

Reading: :meth:`WeightsDataset.rows` (and everything built on it: ``iter_batches``, the trainer, the
streaming PCA) does not fault the mapping in. It reads the rows' bytes from the file with ``os.preadv``
into a fresh buffer (at the data offset found in the safetensors header, or in the zip record of the
``.pt`` file), so the process's resident memory holds only the batch: a pass over a 26 GB file keeps RSS
bounded, while the kernel's page cache still serves repeated passes.

Example:
    >>> ds = open_weights("data/dataset")                      # doctest: +SKIP
    >>> len(ds), ds.dim                                         # doctest: +SKIP
    (4000, 5376)
    >>> for batch in ds.iter_batches(256, shuffle=True):        # [B, D] float32  # doctest: +SKIP
    ...     z = ds.standardise(batch)
"""

from .dataset import WeightsDataset, open_weights
from .formats import OURS_FILES, W2W_FILES, W2W_REPO
from .hub import download_w2w
from .write import export_w2w_layout, save_weights, write_attributes_csv

__all__ = ["WeightsDataset", "open_weights", "save_weights", "export_w2w_layout", "download_w2w",
           "write_attributes_csv", "OURS_FILES", "W2W_FILES", "W2W_REPO"]
