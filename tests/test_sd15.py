"""The sd15 world as far as a CPU allows: its spaces built from a small fake of the public w2w files, and
the rule by which `w2w book` / `w2w run` skip the chapters that do not run in a profile's world.

The fakes (``tests/sd15_fakes.py``) have the public formats exactly: the hub's file names and arrangement,
``weight_dimensions.pt`` as an ordered dict ``key -> [[numel], torch.Size(shape)]`` over SD 1.5's own LoRA layout
(D = 99,648, w2w's ``lora_unet_`` key prefix), float32 ``all_weights.pt``, ``mean.pt`` and ``std.pt``, but only
60 identities; and a diffusers pipeline with SD 1.5's UNet (random weights, latent size 8). With them and the
FaceNet scorer on random weights, ``w2w book`` runs every chapter that has an sd15 path under ``sd15-dry``:
the sd15 profile with only its paths, device, scorer weights and sizes changed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import nbformat
import pytest
import torch

from w2wlib import W2WError, load_profile
from w2wlib.book import build_book, chapter_worlds, check_chapter, run_notebook, unsupported_reason
from w2wlib.cli import main
from w2wlib.data import open_weights
from w2wlib.spaces import SD15_DIM, PCASpace, VAEConfig, load_space
from w2wlib.spaces.build import SpacesConfig, build_spaces
from w2wlib.spaces.shipped import open_spaces
from w2wlib.stages import verify_manifest

from sd15_fakes import N_PUBLIC, dry_profile, write_photos, write_public_files, write_sd15_pipeline

N = N_PUBLIC          # identities in the fake public files


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public w2w files (hub arrangement) for N identities of SD 1.5's layout: low rank plus noise."""
    return write_public_files(tmp_path_factory.mktemp("w2w_public"))


def small(cfg: SpacesConfig) -> SpacesConfig:
    """The sd15 preset with sizes that fit N = 60 identities; every other choice (the streaming PCA's options,
    the VAE's MLP family, the KL schedule, mixed precision) is the preset's own."""
    train = {**cfg.train, "steps": 6, "batch_size": 8, "warmup": 1, "beta_warmup": 2, "beta_ramp": 2,
             "checkpoint_every": 6, "val_every": 3, "log_every": 3}
    return dataclasses.replace(cfg, pca_k=8, latent=4, vae={"hidden": [32]}, train=train)


# ---------------------------------------------------------------------- SpacesConfig.preset("sd15")


def test_the_sd15_preset_is_w2ws_pca_and_the_seeds_vae():
    cfg = SpacesConfig.preset("sd15")
    assert cfg.pca_k == 10_000 and cfg.latent == 512 and cfg.pca["method"] == "randomized"
    assert cfg.vae_config(SD15_DIM) == VAEConfig.sd15()           # 99,648 -> 4,096 -> 2,048 -> 1,024 -> 512
    assert cfg.train_config().mixed_precision == "auto"            # bf16 autocast on a CUDA GPU that has it
    cfg.check_fits(64_974, SD15_DIM)                               # the public dataset fits
    assert load_profile("sd15").get("spaces_config") == "sd15"
    with pytest.raises(W2WError, match=r"unknown option\(s\) \['niter'\]"):
        SpacesConfig(pca={"niter": 20})


def test_the_public_files_are_prompted_as_w2w_trained_them(public, root):
    from w2wlib.sampling import instance_prompt

    assert instance_prompt(open_weights(public)) == "sks person"                   # w2w's train.sh; the files record none
    assert instance_prompt(open_weights(load_profile("mini").path("dataset_dir"))) == "a photo of sks person"   # ours: its record


def test_the_streaming_pca_matches_an_exact_svd_and_reads_bounded_blocks(public):
    ds = open_weights(public)
    cfg = SpacesConfig.preset("sd15")
    rows = cfg.train_config().split(len(ds))[0]
    seen: list[int] = []
    read = ds.rows
    ds.rows = lambda idx: (seen.append(len(idx)), read(idx))[1]     # record every block the fit reads
    space = PCASpace.fit(ds, 8, rows=rows, **{**cfg.pca, "batch_size": 16})
    assert space.method == "randomized" and max(seen) == 16
    assert sum(seen) == (2 + cfg.pca["power_iters"]) * len(rows)    # whole passes over the training rows, no more
    # the reference: an exact SVD of the standardised training rows, in float64
    a = ds.standardise(read(rows)).double()                            # [54, 99648]
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(space.singular_values.double(), s[:8], rtol=1e-4, atol=0)
    cos = (space.components.double() * vh[:8].T).sum(0).abs()         # each component against its reference
    assert cos.min() > 0.9999, cos
    coeffs = a @ space.components.double()
    torch.testing.assert_close(space.coeff_mean.double(), coeffs.mean(0), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(space.coeff_std.double(), coeffs.std(0), atol=1e-3, rtol=1e-3)
    assert float(space.explained_variance_ratio.sum()) == pytest.approx(float(s[:8].square().sum() / s.square().sum()), rel=1e-4)


@pytest.fixture(scope="module")
def public_spaces(public, tmp_path_factory):
    """The sd15 spaces of the fake public files, built once at the sizes that fit it (``small``)."""
    out = tmp_path_factory.mktemp("sd15") / "spaces"
    return out, build_spaces(out, small(SpacesConfig.preset("sd15")), public, progress=False)


def test_spaces_build_sd15_runs_end_to_end_on_the_public_format(public, public_spaces):
    out, manifest = public_spaces
    cfg = small(SpacesConfig.preset("sd15"))
    # the artifact kinds of the mini build; the amortised inverters need renders, which the public files lack
    assert {"pca/config.json", "pca/tensors.safetensors", "vae/config.json", "vae/tensors.safetensors",
            "vae_history.json"} <= set(manifest["files"]) and (out / "split.json").is_file()
    assert verify_manifest(out) == [] and manifest["config"]["name"] == "sd15"
    assert manifest["results"]["pca"]["method"] == "randomized"
    assert manifest["results"]["amortised"] == {"skipped": "no identity seeds to render"}
    assert SpacesConfig.from_manifest(out) == cfg
    S = open_spaces(out, public)                          # both spaces carry the dataset's own standardisation
    assert S.pca.latent_dim == 8 and S.vae.latent_dim == 4 and S.pca.dim == S.vae.dim == SD15_DIM
    val = S.dataset.rows(S.val_rows)                      # raw held-out rows [6, D]
    for space in (S.pca, S.vae):
        back = space.decode_weights(space.encode_weights(val))
        assert back.shape == val.shape and torch.isfinite(back).all()
    # the PCA of the build is the one fitted directly on the same rows
    direct = PCASpace.fit(S.dataset, 8, rows=S.train_rows, **cfg.pca)
    torch.testing.assert_close(load_space(out / "pca").components, direct.components)


def test_spaces_build_sd15_refuses_a_dataset_too_small_before_any_work(public, tmp_path, capsys):
    out = tmp_path / "spaces"
    assert main(["spaces", "build", "--config", "sd15", "--dataset", str(public), "--out", str(out),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "spaces config 'sd15' keeps pca_k=10,000 components" in err and "54 training identities (of 60)" in err
    assert "pca_k <= 54" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()                                          # refused before any stage wrote anything
    # without --config, the sd15 profile's spaces_config (sd15) is the preset
    assert main(["spaces", "build", "--profile", "sd15", "--dataset", str(public), "--out", str(out),
                 "--device", "cpu"]) == 1
    assert "spaces config 'sd15' keeps pca_k=10,000" in capsys.readouterr().err and not out.exists()
    with pytest.raises(W2WError, match=r"batches of 64, but .* only 54 training identities"):
        dataclasses.replace(SpacesConfig.preset("sd15"), pca_k=8).check_fits(N, SD15_DIM)


# ---------------------------------------------------------------------- the world of a chapter


def _notebook(path, meta=None, title="# A chapter"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if meta is not None:
        nb.metadata["w2w"] = meta
    params = nbformat.v4.new_code_cell('profile = "smoke"\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(title), params, nbformat.v4.new_code_cell("print(profile)")]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def book_root(tmp_path, root, monkeypatch):
    """A project whose book has a mini-only chapter and a chapter for both worlds."""
    for name in ("_config.yml", "references.bib"):
        shutil.copy2(root / name, tmp_path / name)
    (tmp_path / "w2wlib").mkdir()
    shutil.copytree(root / "book/_vendor", tmp_path / "book/_vendor")       # the widget JavaScript the config names
    (tmp_path / "book/intro.md").write_text("# Intro\n")
    (tmp_path / "book/status.md").write_text("# Status\n")
    _notebook(tmp_path / "book/mini_only.ipynb", {"worlds": ["mini"], "reason": "it builds the mini world itself."},
              "# The mini world")
    _notebook(tmp_path / "book/both.ipynb", {"worlds": ["mini", "sd15"]}, "# Both worlds")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/mini_only\n"
                                       "  - file: book/both\n  - file: book/status\n")
    monkeypatch.setenv("W2W_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_chapter_states_its_worlds_in_its_metadata(tmp_path):
    sd15, mini = load_profile("sd15"), load_profile("mini")
    plain = _notebook(tmp_path / "plain.ipynb")
    assert chapter_worlds(plain) == (("mini",), None)               # a chapter that states nothing: mini only
    assert unsupported_reason(plain, mini) is None
    assert unsupported_reason(plain, sd15) == ("plain.ipynb does not run in the sd15 world (profile 'sd15'): it states "
                                               "no worlds (notebook metadata w2w.worlds), so it runs in the mini world "
                                               "only; it runs in: mini")
    both = _notebook(tmp_path / "both.ipynb", {"worlds": ["mini", "sd15"]})
    assert unsupported_reason(both, sd15) is None and unsupported_reason(both, mini) is None
    for bad, match in (({"worlds": ["sd51"]}, r"w2w.worlds is \['sd51'\]"), ({"worlds": []}, r"w2w.worlds is \[\]"),
                       ({"worlds": ["mini"], "why": "x"}, "keys worlds and reason"),
                       ({"worlds": ["mini"], "reason": "two\nlines"}, "reason must be one line")):
        with pytest.raises(W2WError, match=match):
            chapter_worlds(_notebook(tmp_path / "bad.ipynb", bad))


def test_w2w_run_refuses_a_chapter_of_another_world_in_one_line(book_root, capsys):
    sd15 = load_profile("sd15", root=book_root)
    why = (r"mini_only.ipynb does not run in the sd15 world \(profile 'sd15'\): it builds the mini world itself; "
           r"it runs in: mini \(use --profile mini or smoke\)$")
    with pytest.raises(W2WError, match=why):
        run_notebook(book_root / "book/mini_only.ipynb", book_root / "out.ipynb", sd15)
    with pytest.raises(W2WError, match=why):
        check_chapter("mini_only", sd15)                            # the guard a notebook's first cell can call
    check_chapter("mini_only", load_profile("mini", root=book_root))
    assert main(["run", "book/mini_only.ipynb", "--profile", "sd15"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("w2w: error: mini_only.ipynb does not run in the sd15 world")
    assert not (book_root / "out.ipynb").exists() and not (book_root / "_build").exists()
    with pytest.raises(W2WError, match=r"--only mini_only: mini_only.ipynb does not run in the sd15 world"):
        build_book(sd15, only=["mini_only"], progress=False)


def test_w2w_book_skips_a_chapter_of_another_world_and_says_why(book_root, capsys):
    assert main(["book", "--profile", "sd15"]) == 0
    printed = capsys.readouterr().out
    assert ("skipped book/mini_only.ipynb: mini_only.ipynb does not run in the sd15 world (profile 'sd15'): it builds "
            "the mini world itself; it runs in: mini\n") in printed
    runs = {r["path"]: r for r in json.loads((book_root / "_build/runs.json").read_text())}
    assert runs["book/mini_only.ipynb"]["seconds"] is None and "it builds the mini world" in runs["book/mini_only.ipynb"]["skipped"]
    assert runs["book/both.ipynb"]["seconds"] is not None and runs["book/both.ipynb"]["skipped"] is None
    status = (book_root / "_build/src/book/status.md").read_text()
    assert "## Chapters skipped" in status and "| `book/mini_only.ipynb` | mini_only.ipynb does not run" in status
    copy = nbformat.read(book_root / "_build/src/book/mini_only.ipynb", as_version=4)
    assert copy.cells[0].source == "# The mini world" and "not run in this build" in copy.cells[1].source
    page = (book_root / "_build/html/book/mini_only.html").read_text()
    assert "This chapter was not run in this build" in page and "it builds the mini world itself" in page


#: The chapters' sizes under sd15-dry: a step or two of everything (a forward of SD 1.5's UNet takes about 1 s here).
DRY_SIZES = {
    "weights_dataset": {"n_live": 1, "n_images": 2, "n_pin": 2, "pin_images": 2, "inference_steps": 2, "n_stats": 60,
                        "n_components": 16},
    "training_vae": {"steps": 4, "compare_steps": 4, "pca_ks": [2, 4, 8]},
    "latent_space": {"n_eval": 2, "n_images": 2, "inference_steps": 2, "sweep": [2, 4]},
    "sampling": {"n_samples": 2, "n_images": 2, "inference_steps": 2, "interp_steps": 3, "n_paths": 1, "n_fit": 16},
    "editing": {"attributes": ["Male"], "n_rows": 2, "n_images": 2, "inference_steps": 2, "strengths": [0, 3],
                "switches": [1000, 0]},
    "inversion": {"steps": 2, "w2w_steps": 2, "generations": 2, "amortised_steps": 1, "n_images": 2,
                  "inference_steps": 2},
}


@pytest.fixture(scope="module")
def sd15_dry(public, public_spaces, root, tmp_path_factory):
    """The sd15-dry profile (a YAML file): sd15.yaml with the fakes in place of its downloads."""
    folder = tmp_path_factory.mktemp("sd15_dry")
    pipeline = write_sd15_pipeline(folder / "pipeline", load_profile("mini").path("world_dir") / "pipeline")
    photos = write_photos(folder / "photos", 2)          # one photo per person: each its own reference
    return dry_profile(root, folder / "sd15-dry.yaml", public=public, spaces=public_spaces[0], pipeline=pipeline,
                       photos=photos, notebooks=DRY_SIZES)


def _outputs(executed) -> tuple[str, list]:
    outputs = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    return text, outputs


def test_the_sd15_dry_profile_is_the_sd15_profile_on_fakes(sd15_dry, root):
    from w2wlib.facenet import FaceScorer
    from w2wlib.models import has_attributes, open_models

    dry, sd15 = load_profile(sd15_dry, root=root), load_profile("sd15")
    same = {k for k in sd15.settings if k not in ("dataset_dir", "spaces_dir", "data_dir", "base_model", "device",
                                                    "dtype", "scorer_options", "sampler")}
    assert {k: dry.get(k) for k in same} == {k: sd15.get(k) for k in same}
    M = open_models(dry)
    assert M.pipe.unet.config.cross_attention_dim == 768 and M.draw["layout"].dim == SD15_DIM
    assert M.draw["prompt"] == "sks person" and M.draw["negative_prompt"] == sd15.get("sampler.negative_prompt")
    assert M.draw["guidance"] == 3.0 and M.draw["steps"] == 2
    assert isinstance(M.scorer, FaceScorer) and not has_attributes(M.scorer)
    with pytest.raises(W2WError, match=r"scorer_options has \['weights'\]"):
        open_models(dry.with_overrides({"scorer_options": {"weights": "x"}}), spaces=False)
    with pytest.raises(W2WError, match="not a diffusers scheduler class"):
        open_models(dry.with_overrides({"sampler.scheduler": "Adam"}), spaces=False, scorer=False)
    with pytest.raises(W2WError, match="no such folder, and not a hub id"):
        open_models(dry.with_overrides({"base_model": "./no/such/pipeline"}), spaces=False, scorer=False)
    # pca_k: w2w samples and edits with the first 1,000 of its 10,000 PCs (here: 4 of the fake's 8), inverts with all
    few = dry.with_overrides({"pca_k": 4})
    assert open_models(few, scorer=False).spaces.pca.latent_dim == 4
    assert open_models(few, scorer=False, pca_k=False).spaces.pca.latent_dim == 8 == M.spaces.pca.latent_dim


def test_w2w_invert_and_sample_run_on_the_sd15_code_path(sd15_dry, tmp_path, capsys):
    """The commands under the dry profile: SD 1.5's pipeline from base_model, w2w's prompt, the profile's sampler."""
    photos = write_photos(tmp_path / "photos", 1)
    assert main(["invert", str(photos / "photo_0.png"), "--profile", str(sd15_dry), "--space", "pca", "--steps", "1",
                 "--preview", "1", "--out", str(tmp_path / "inv")]) == 0
    info = json.loads((tmp_path / "inv" / "photo_0" / "info.json").read_text())
    assert info["inversion"]["prompt"] == "sks person" and info["inversion"]["steps"] == 1
    assert main(["sample", "--profile", str(sd15_dry), "--space", "vae", "-n", "1", "--preview", "1",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "vae_000" / "pytorch_lora_weights.safetensors").is_file()


def test_w2w_book_builds_every_sd15_chapter_on_the_dry_world(sd15_dry, root, tmp_path):
    """`w2w book --profile sd15-dry.yaml`: the chapters with an sd15 path run, the others are skipped with a reason."""
    profile = load_profile(sd15_dry, root=root)
    build_book(profile, out=tmp_path / "_build", progress=False)
    runs = {r["path"]: r for r in json.loads((tmp_path / "_build/runs.json").read_text())}
    ran = sorted(p.split("/")[-1].removesuffix(".ipynb") for p, r in runs.items() if not r["skipped"])
    assert ran == sorted(DRY_SIZES)
    assert "it builds and inspects the mini world itself" in runs["book/mini_world.ipynb"]["skipped"]
    src = tmp_path / "_build/src/book"
    # "Training the VAE": the public layout, the mini record refused, the six schedules live
    text, outputs = _outputs(src / "training_vae.ipynb")
    assert f"D = {SD15_DIM:,}" in text and "WeightsDataset(" in text and "layout='w2w'" in text
    assert "was recorded on another dataset" in text                 # the mini record is refused, the six run live
    assert all(f"| {name} |" in text for name in ("β 1, constant", "β D, cyclical", "β D, warm-up + linear, free bits 0.5"))
    assert "at k = 4: PCA" in text
    # "Sampling and interpolation": SD 1.5's UNet draws every source, FaceNet scores them, no attribute table
    text, outputs = _outputs(src / "sampling.ipynb")
    assert "| sampled, PCA |" in text and "| dataset, held out |" in text and "| VAE, slerp |" in text
    assert "reads identities, not attributes" in text
    # "The dataset of weights": the public files' statistics, then each public LoRA's images and their consistency
    text, _ = _outputs(src / "weights_dataset.ipynb")
    assert "layout='w2w'" in text and "identity consistency over 2 noise seeds: within a LoRA" in text
    assert "balanced accuracy" in text                                  # the probe reads the converted labels
    assert "1 rows through diffusers' load_lora_weights against w2wlib's batch: largest pixel difference" in text
    # "The latent space": reconstructions scored against the own LoRA's images (public rows come without photos)
    text, _ = _outputs(src / "latent_space.ipynb")
    assert "scored against own LoRA, other seeds" in text and "| own LoRA (oracle) |" in text and "| VAE (w2w++) |" in text
    # "Editing": the directions' AUC from the labels, the identity kept, no flip rates without an attribute head
    text, _ = _outputs(src / "editing.ipynb")
    assert "| Male | PCA |" in text and "only the identity kept is measured here" in text
    # "Inversion": the user's photos (a folder), every method, no ceiling
    text, _ = _outputs(src / "inversion.ipynb")
    for row in ("PCA, gradient (w2w's recipe)", "VAE, gradient (ours)", "VAE, CMA-ES", "floor: base model",
                "DreamBooth on the one input (unconstrained)"):
        assert f"| {row} |" in text, row
    assert "ceiling:" not in text and "amortised" not in text.split("amortised inverters:")[0]
    for stem in ran:
        assert (tmp_path / f"_build/html/book/{stem}.html").is_file()


def test_w2ws_underscore_keys_map_through_sd15s_own_unet(public):
    """w2w's files spell SD 1.5's modules with underscores (lora_unet_down_blocks_0_...), which cannot be read
    back into dotted names: rows of SD 1.5's length map through its meta-device UNet, to the same layout."""
    from w2wlib.lora import sd15_layout

    layout = open_weights(public).lora_layout()
    want = sd15_layout()
    assert layout.dim == SD15_DIM and layout.alpha == 27.0
    assert layout.entries == want.entries                 # modules, shapes and offsets, in the flat order
