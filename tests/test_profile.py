from pathlib import Path

import pytest
import torch

from w2wlib import ProfileError, list_profiles, load_profile
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
    assert p.path("world_dir") == tmp_path / "data" / "world"
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
