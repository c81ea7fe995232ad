"""Fakes of what the sd15 profile downloads, in exactly the public formats, for dry runs with no network and no GPU.

- :func:`write_public_files`: the public w2w files in the hub's arrangement (``files/`` and
  ``weights_datasets/identities/all_weights.pt``) for a few identities of SD 1.5's own LoRA layout (D = 99,648,
  w2w's ``lora_unet_`` keys), float32, with a low-rank identity structure, and CelebA-style labels as
  ``files/attributes.csv``, the form into which :mod:`w2wlib.data` converts w2w's pickled ``identity_df.pt`` once.
- :func:`write_sd15_pipeline`: a diffusers ``StableDiffusionPipeline`` folder whose UNet is SD 1.5's own
  architecture (``SD15_UNET_CONFIG``: the modules and shapes of ``sd15_layout()``) with random weights, at a
  latent size of 8 (64 px images) so that a CPU runs a step in about a second. Its text encoder is a one-layer
  CLIP text model of SD 1.5's width (768, what the UNet's cross-attention reads), and its tokenizer and
  autoencoder are the mini world's (the autoencoder also has SD's 8x downsampling and 4 latent channels).
- :func:`write_photos`: a folder of "user photos" (PNG) for the inversion chapter.
- :func:`dry_profile`: the sd15 profile itself with only its paths, device, dtype, scorer weights and
  chapter sizes changed: the ``sd15-dry`` profile under which the tests build the book.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import torch
import yaml

N_PUBLIC, RANK = 60, 12     # identities in the fake public files; rank of their identity structure
ATTRIBUTES = ("Male", "Eyeglasses", "Beard", "Bald", "Young")


def write_public_files(folder: Path, n: int = N_PUBLIC, rank: int = RANK) -> Path:
    """The public w2w files for ``n`` identities: a decaying low-rank structure plus noise, attributes tied to it."""
    from w2wlib.data import write_attributes_csv
    from w2wlib.lora import sd15_layout
    from w2wlib.spaces import SD15_DIM

    layout = sd15_layout()
    assert layout.dim == SD15_DIM
    g = torch.Generator().manual_seed(0)
    scales = 10 * 0.7 ** torch.arange(rank, dtype=torch.float32)                    # a decaying spectrum
    codes = torch.randn(n, rank, generator=g) * scales                              # [n, r]
    basis = torch.randn(rank, SD15_DIM, generator=g) / SD15_DIM ** 0.5             # [r, D]
    W = 0.01 * (codes @ basis * 30 + 0.05 * torch.randn(n, SD15_DIM, generator=g)) + 0.002  # [n, D] float32
    folder = Path(folder)
    (folder / "files").mkdir(parents=True, exist_ok=True)
    (folder / "weights_datasets/identities").mkdir(parents=True, exist_ok=True)
    wd = collections.OrderedDict()                      # w2w's key -> [[numel], shape], in the flat order
    for e in layout.entries:
        for ab, shape in (("A", e.a_shape), ("B", e.b_shape)):
            wd[f"lora_unet_{e.module}.lora_{ab}.weight"] = [[shape[0] * shape[1]], torch.Size(shape)]
    torch.save(W, folder / "weights_datasets/identities/all_weights.pt")
    torch.save(W.mean(0), folder / "files/mean.pt")
    torch.save(W.std(0), folder / "files/std.pt")
    torch.save(wd, folder / "files/weight_dimensions.pt")
    (folder / "files/adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 27,
                                                                  "target_modules": ["to_q", "to_v"]}))
    labels = {a: (codes[:, i % rank] + 0.3 * torch.randn(n, generator=g) > 0).numpy().astype(np.int64)
              for i, a in enumerate(ATTRIBUTES)}          # each attribute read off one identity direction, noisily
    write_attributes_csv(folder / "files/attributes.csv", labels)   # identity_df.pt once converted (data/README)
    return folder


def write_sd15_pipeline(folder: Path, mini_pipeline: Path) -> Path:
    """A ``StableDiffusionPipeline`` with SD 1.5's UNet (random weights, latent size 8) into ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from w2wlib.lora import SD15_UNET_CONFIG

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(mini_pipeline / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=768,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": 8})
    with torch.no_grad():                    # random weights, scaled so that a forward stays finite and O(1)
        for p in unet.parameters():
            p.mul_(0.5)
    vae = AutoencoderKL.from_pretrained(mini_pipeline / "vae")
    vae.register_to_config(_name_or_path=None)
    scheduler = DDIMScheduler.from_pretrained(mini_pipeline / "scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_photos(folder: Path, n: int = 2, size: int = 80) -> Path:
    """``n`` PNG "photos" (a smooth face-coloured blob on a background), of another size than the pipeline's."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        blob = np.exp(-((xx - 0.5) ** 2 / 0.05 + (yy - 0.45 - 0.05 * i) ** 2 / 0.08))[..., None]
        img = (1 - blob) * np.array([60, 90, 140 - 30 * i]) + blob * np.array([225, 180, 150])
        Image.fromarray(img.round().astype(np.uint8)).save(folder / f"photo_{i}.png")
    return folder


def dry_profile(root: Path, path: Path, *, public: Path, spaces: Path, pipeline: Path, photos: Path | None = None,
                notebooks: dict | None = None) -> Path:
    """``sd15-dry.yaml`` at ``path``: w2wlib/profiles/sd15.yaml with the fakes in place of the downloads."""
    data = yaml.safe_load((root / "w2wlib" / "profiles" / "sd15.yaml").read_text())
    data["description"] = "sd15-dry: the sd15 profile on fakes of its downloads (tests only)"
    data["settings"].update(dataset_dir=str(public), spaces_dir=str(spaces), data_dir=str(path.parent),
                            base_model=str(pipeline), device="cpu", dtype="float32",
                            scorer_options={"pretrained": False, "align": False})
    data["settings"]["sampler"].update(steps=2)
    if photos is not None:
        data["notebooks"].setdefault("inversion", {})["photos"] = str(photos)
    for stem, params in (notebooks or {}).items():
        data["notebooks"][stem] = {**data["notebooks"].get(stem, {}), **params}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
