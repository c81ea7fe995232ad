"""The mini world's quality gates (``w2w world check``): is it a faithful miniature?

- **autoencoder**: the ID score between held-out renders and their reconstructions;
- **base-model samples** (``"a photo of a person"``):
  - FID in the identity encoder's embedding space against fresh renders, next to the same distance
    between two sets of fresh renders (the floor set by sampling noise);
  - attribute frequencies of the samples (from the encoder's attribute head) against the renderer's prior;
  - the similarity of each sample to its nearest training identity, next to the same for held-out
    renders: if samples sit no closer to the training set than new people do, the model generalises
    rather than copies;
- **prompt adherence**: the share of samples of "a photo of a person with blond hair" (and five more
  phrases, :data:`ADHERENCE_PROMPTS`) that the encoder's attribute head sees with the named attribute:
  does the text steer the model, as SD 1.5's does?
- **sharpness**: the variance of the Laplacian of samples over that of the autoencoder's reconstructions
  of renders (1.0: as sharp as the autoencoder allows);
- **identity encoder**: verification ROC AUC and attribute accuracy on held-out identities, and its
  attribute accuracy on the autoencoder's reconstructions (generated-looking images whose truth is known).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..metrics import frechet_distance
from . import encoder as E
from . import pipeline as P
from .render import ATTRIBUTES, attribute_prior, attributes, held_out_seeds, render_ids, sample_identities

__all__ = ["quality_gates", "sample_base_model", "reconstruct", "nearest_training_identities", "held_out_seeds",
           "prompt_adherence", "sharpness", "ADHERENCE_PROMPTS"]

#: attribute -> a prompt naming it; the adherence gate asks how often the samples have the attribute.
ADHERENCE_PROMPTS: dict[str, str] = {
    "Eyeglasses": "a photo of a person with glasses", "Blond_Hair": "a photo of a person with blond hair",
    "Black_Hair": "a photo of a person with black hair", "Gray_Hair": "a photo of a person with gray hair",
    "Beard": "a photo of a man with beard", "Bald": "a photo of a bald man"}


@torch.no_grad()
def sample_base_model(pipe, n: int, *, prompt: str = "a photo of a person", seed: int = 0, steps: int = 25,
                      guidance: float = 4.0, batch: int = 64) -> np.ndarray:
    """``n`` base-model samples as uint8 ``[n, 64, 64, 3]``, deterministic in ``seed``."""
    out = []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        gen = torch.Generator().manual_seed(seed + i)
        imgs = pipe([prompt] * k, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                    generator=gen, output_type="np").images
        out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def prompt_adherence(pipe, enc, n: int = 32, *, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                     prompts: dict[str, str] | None = None) -> dict[str, float]:
    """attribute -> share of ``n`` samples of its prompt that the encoder's attribute head sees with it."""
    out = {}
    for attr, prompt in (prompts or ADHERENCE_PROMPTS).items():
        imgs = sample_base_model(pipe, n, prompt=prompt, seed=seed, steps=steps, guidance=guidance)
        probs = torch.sigmoid(enc.predict_attributes(imgs))[:, ATTRIBUTES.index(attr)]
        out[attr] = float((probs > 0.5).float().mean())
    return out


def sharpness(images: np.ndarray) -> float:
    """Mean variance of the Laplacian of uint8 ``[N, H, W, 3]`` images (gray, in [0, 1]): higher is sharper."""
    gray = torch.from_numpy(images).float().mean(-1)[:, None] / 255                   # [N, 1, H, W]
    lap = torch.nn.functional.conv2d(gray, torch.tensor([[[[0., 1, 0], [1, -4, 1], [0, 1, 0]]]]))
    return float(lap.flatten(1).var(1).mean())


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """Autoencoder reconstructions (posterior mean, decoded) of uint8 ``[N, 64, 64, 3]`` images."""
    from ..viz import to_tensor, to_uint8

    return to_uint8(P.autoencode(vae, to_tensor(images)))


def nearest_training_identities(enc, images: np.ndarray, *, n_train: int = 1024, seed: int = 0):
    """For each image, the most similar of ``n_train`` training identities (one render each).

    Returns ``(train_seeds [N], similarities [N])``: a model that copies its training set would give
    samples much closer to their nearest training identity than held-out renders are.
    """
    train_ids = np.random.default_rng([seed, 7]).choice(P.TRAIN_IDENTITY_SEEDS.stop, n_train, replace=False)
    emb_t = enc.embed(render_ids(train_ids, np.zeros_like(train_ids)))      # [T, E]
    sims = enc.embed(images) @ emb_t.T                                      # [N, T]
    best = sims.max(1)
    return train_ids[best.indices.numpy()], best.values.numpy()


@torch.no_grad()
def quality_gates(world: Path, *, n_identities: int = 200, n_samples: int = 256, guidance: float = 7.5,
                  device: torch.device | str = "cpu", progress: bool = True, seed: int = 0) -> dict:
    """Compute every gate for the world in ``world`` (samples drawn at CFG ``guidance``); returns a JSON-able dict."""
    pipe = P.load_pipeline(world / "pipeline", device=device)
    enc = E.load_encoder(world / "identity_encoder", device=device)
    ver = E.verification(enc, n_identities=n_identities, n_views=4, seed=seed)
    renders = render_ids(held_out_seeds(n_identities, seed + 1), np.arange(n_identities))
    recon = reconstruct(pipe.vae, renders)
    rec_scores = E.pairwise_id_scores(enc, renders, recon)
    other = E.pairwise_id_scores(enc, renders, np.roll(recon, 1, 0))  # a different identity's reconstruction
    samples = sample_base_model(pipe, n_samples, seed=seed, guidance=guidance)
    fresh = render_ids(held_out_seeds(n_samples, seed + 2), np.arange(n_samples))
    fresh2 = render_ids(held_out_seeds(n_samples, seed + 3), np.arange(n_samples))
    emb_s, emb_f, emb_f2 = enc.embed(samples), enc.embed(fresh), enc.embed(fresh2)
    # one search for both sets: the training identities are rendered and embedded once
    _, near = nearest_training_identities(enc, np.concatenate([samples, fresh]), n_train=4 * n_samples, seed=seed)
    near_samples, near_fresh = near[:n_samples], near[n_samples:]
    prior = attribute_prior(20000, seed)
    freq = (torch.sigmoid(enc.predict_attributes(samples)) > 0.5).float().mean(0)
    adherence = prompt_adherence(pipe, enc, max(32, n_samples // 8), seed=seed + 4, guidance=guidance)
    truth = attributes(sample_identities(held_out_seeds(n_identities, seed + 1)))
    recon_acc = ((torch.sigmoid(enc.predict_attributes(recon)) > 0.5).numpy() == truth).mean(0)
    return {
        "autoencoder": {"reconstruction_id_score": float(rec_scores.mean()),
                        "other_identity_id_score": float(other.mean())},
        "samples": {
            "n": n_samples,
            "guidance": guidance,
            "fid_identity_space": frechet_distance(emb_s, emb_f),
            "fid_identity_space_render_floor": frechet_distance(emb_f2, emb_f),
            "attribute_frequency": {a: float(f) for a, f in zip(ATTRIBUTES, freq)},
            "attribute_prior": prior,
            "attribute_mean_abs_gap": float(np.mean([abs(float(f) - prior[a]) for a, f in zip(ATTRIBUTES, freq)])),
            "nearest_train_similarity": float(near_samples.mean()),
            "nearest_train_similarity_held_out_renders": float(near_fresh.mean()),
            "sharpness": sharpness(samples),
            "sharpness_of_reconstructions": sharpness(recon),
            "sharpness_ratio": sharpness(samples) / sharpness(recon),
        },
        "prompt_adherence": {"share": adherence, "mean": float(np.mean(list(adherence.values()))),
                             "min": float(min(adherence.values())), "prompts": ADHERENCE_PROMPTS},
        "identity_encoder": {"verification_auc": ver["auc"], "attribute_accuracy": ver["attr_acc"],
                             "same_identity_similarity": ver["same_mean"], "different_identity_similarity": ver["diff_mean"],
                             "attribute_accuracy_on_reconstructions": {a: float(x) for a, x in zip(ATTRIBUTES, recon_acc)}},
    }
