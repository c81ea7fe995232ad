from pathlib import Path

import pytest
import torch

from w2wlib import ProfileError, W2WError, list_profiles, load_profile, project_root
from w2wlib.profile import parse_value


def test_shipped_profiles_share_their_keys():
    profiles = {name: load_profile(name) for name in list_profiles()}
    assert set(profiles) >= {"smoke", "mini", "sd15"}
    keys = {name: set(p.settings) for name, p in profiles.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1, f"profiles disagree on their settings: {keys}"


def test_overrides_apply_and_keep_types(tmp_path):
    p = load_profile("mini", {"seed": 7, "device": "cpu"})
    assert p.get("seed") == 7 and p.device == torch.device("cpu")
    assert load_profile("mini").get("seed") == 0  # the original is untouched
    with pytest.raises(ProfileError, match="no setting 'nope'"):
        load_profile("mini", {"nope": 1})
    with pytest.raises(ProfileError, match="has type str"):
        load_profile("mini", {"seed": "seven"})


def test_unknown_and_malformed_profiles(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'gpu9000'.*smoke"):
        load_profile("gpu9000")
    bad = tmp_path / "bad.yaml"
    bad.write_text("settings: [1, 2]\n")
    with pytest.raises(ProfileError, match="must have a 'settings' mapping"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")


def test_paths_resolve_under_the_root(tmp_path):
    p = load_profile("mini", root=tmp_path)
    assert p.path("world_dir") == tmp_path / "data" / "next" / "world"
    assert load_profile("sd15").path("data_dir").is_relative_to(Path.home())


def test_device_and_dtype_are_chosen_once():
    p = load_profile("sd15", {"device": "cpu"})
    assert p.dtype == torch.float32  # half precision is a GPU-only choice
    with pytest.raises(ProfileError, match="dtype 'float99'; use float32, float16 or bfloat16"):
        _ = load_profile("mini", {"dtype": "float99"}).dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's choices and error")
def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused():
    assert load_profile("sd15").device == torch.device("cpu") and load_profile("sd15").dtype == torch.float32
    with pytest.raises(ProfileError, match="asks for device 'cuda' but no CUDA device is visible; use device=cpu"):
        _ = load_profile("mini", {"device": "cuda"}).device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU choices need a CUDA device")
def test_with_cuda_auto_is_the_gpu_with_the_profiles_dtype():
    p = load_profile("sd15")
    assert p.device == torch.device("cuda") and p.dtype == torch.float16
    assert load_profile("mini", {"device": "cuda:0"}).device == torch.device("cuda:0")
    n = torch.cuda.device_count()
    with pytest.raises(ProfileError, match=rf"asks for device 'cuda:{n}' but only {n} CUDA device\(s\) are visible"):
        _ = load_profile("mini", {"device": f"cuda:{n}"}).device


def test_parse_value():
    assert parse_value("8") == 8 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("a photo") == "a photo" and parse_value("[1, 2]") == [1, 2]


def _leaves(tree, prefix=""):
    """Dotted key -> value of every leaf of a nested settings mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_profile_has_the_shared_settings_with_their_types():
    from w2wlib.profile import DEFAULT_SETTINGS

    defaults = _leaves(DEFAULT_SETTINGS)
    for name in list_profiles():
        got = _leaves(load_profile(name).settings)
        assert set(defaults) <= set(got), f"{name} lacks {set(defaults) - set(got)}"
        for key, value in defaults.items():
            assert value is None or got[key] is None or isinstance(got[key], type(value)), (name, key, got[key])
    # smoke and mini state none of them, so they are the mini world's
    for name in ("smoke", "mini"):
        assert {k: _leaves(load_profile(name).settings)[k] for k in defaults} == defaults


def test_the_sd15_profile_is_w2ws_setup():
    from w2wlib.spaces.build import SpacesConfig

    p = load_profile("sd15")
    assert p.get("world") == "sd15" and p.get("base_model") == "stablediffusionapi/realistic-vision-v51"
    assert p.get("resolution") == 512 and p.get("scorer") == "facenet" and p.get("pca_k") == 1000
    assert p.get("sampler") == {"scheduler": None, "steps": 50, "guidance": 3.0, "prompt": "sks person",
                                "negative_prompt": "low quality, blurry, unfinished, cartoon"}
    assert p.get("w2w_repo") == "Snapchat/weights2weights"
    assert p.get("pca_k") < SpacesConfig.preset(p.get("spaces_config")).pca_k == 10_000   # 1,000 used of 10,000 stored
    for name in list_profiles():                       # every profile names a spaces preset that exists
        SpacesConfig.preset(load_profile(name).get("spaces_config"))


def test_every_profile_sets_only_parameters_its_notebooks_declare(root):
    import papermill

    for nb in sorted((root / "book").glob("*.ipynb")):
        declared = set(papermill.inspect_notebook(str(nb)))
        for name in list_profiles():
            extra = set(load_profile(name).notebook_parameters(nb.stem)) - declared
            assert not extra, f"profile {name} sets {sorted(extra)} for {nb.name}, which does not declare them"


def test_shared_settings_are_checked_on_load_and_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, match in (("resolution: '512'", r"bad.yaml sets resolution='512' has type str, but the default 64 is a int"),
                        ("world: sd51", r"world='sd51'; it must be mini or sd15"),
                        ("scorer: arcface", r"scorer='arcface'; it must be encoder or facenet"),
                        ("sampler: {step: 5}", r"sampler has no setting 'step'; it has guidance, negative_prompt"),
                        ("sampler: 5", r"setting sampler must be a mapping"),
                        ("resolution: 500", r"resolution=500; it must be a positive multiple of 8")):
        bad.write_text(f"settings:\n  {text}\n")
        with pytest.raises(ProfileError, match=match):
            load_profile(bad)
    bad.write_text("settings:\n  data_dir: x\n  sampler: {steps: 10}\n")
    p = load_profile(bad)                                       # a partial group keeps the other defaults
    assert p.get("sampler.steps") == 10 and p.get("sampler.guidance") is None and p.get("world") == "mini"
    assert load_profile("sd15", {"sampler.guidance": 2}).get("sampler.guidance") == 2.0
    with pytest.raises(ProfileError, match="pca_k=0; it must be an int >= 1"):
        load_profile("sd15", {"pca_k": 0})


def test_guidance_is_the_profiles_or_the_worlds_own(tmp_path):
    import json

    world = tmp_path / "world"
    world.mkdir()
    prof = tmp_path / "p.yaml"
    prof.write_text(f"settings:\n  world_dir: {world}\n")
    assert load_profile(prof).guidance == 4.0                                   # no manifest: 4.0
    (world / "manifest.json").write_text(json.dumps({"config": {"guidance": 7.5}}))
    assert load_profile(prof).guidance == 7.5                                   # the world's own
    assert load_profile(prof, {"sampler.guidance": 2}).guidance == 2.0          # the profile's, when set
    assert load_profile("sd15").guidance == 3.0
    shipped = json.loads((load_profile("mini").path("world_dir") / "manifest.json").read_text())["config"]
    assert load_profile("mini").guidance == shipped.get("guidance", 4.0)
    (world / "manifest.json").write_text("{not json")
    with pytest.raises(W2WError, match=r"not a readable world manifest .* \(-p sampler.guidance 7.5\)"):
        load_profile(prof).guidance
    for bad in ("'strong'", "-1", "true"):
        with pytest.raises(ProfileError, match="sampler.guidance=.*; it must be a number >= 0"):
            load_profile(prof, {"sampler.guidance": __import__("yaml").safe_load(bad)})


def test_a_profile_from_a_yaml_file_reaches_its_notebooks_by_path(tmp_path):
    """A notebook loads its profile again from the ``profile`` parameter: for a YAML file that must be the
    file, not its stem (which names no shipped profile)."""
    from w2wlib.book import notebook_parameters

    path = tmp_path / "mine.yaml"
    path.write_text("description: mine\nsettings:\n  device: cpu\n")
    p = load_profile(path).with_overrides({"device": "cpu"})
    params = notebook_parameters(project_root() / "book" / "training_vae.ipynb", p)
    assert params["profile"] == str(path.resolve()) and load_profile(params["profile"]).description == "mine"
    assert notebook_parameters(project_root() / "book" / "training_vae.ipynb", load_profile("smoke"))["profile"] == "smoke"
    with pytest.raises(ProfileError, match="unknown profile 'mine'"):
        load_profile(p.name)                        # what the notebook got before: the stem


def test_open_models_gives_the_mini_worlds_pipeline_encoder_and_drawing_settings():
    from w2wlib.models import has_attributes, open_models
    from w2wlib.world.encoder import IdentityEncoder
    from w2wlib.world.pipeline import load_pipeline

    P = load_profile("mini")
    M = open_models(P, steps=3)
    want = load_pipeline(P.path("world_dir") / "pipeline")
    for a, b in zip(M.pipe.unet.state_dict().values(), want.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert isinstance(M.scorer, IdentityEncoder) and has_attributes(M.scorer)
    assert M.draw == {"prompt": "a photo of sks person", "negative_prompt": "", "steps": 3, "guidance": 7.5,
                      "layout": M.dataset.lora_layout(M.pipe.unet)}
    assert M.spaces.dataset is M.dataset and len(M.dataset) == 4096
    swapped = open_models(P.with_overrides({"sampler.scheduler": "PNDMScheduler"}), spaces=False, scorer=False)
    assert type(swapped.pipe.scheduler).__name__ == "PNDMScheduler" and swapped.scorer is None
    assert swapped.draw["steps"] == 25 and swapped.spaces is None
