"""Tests of w2wlib.spaces: PCA against numpy's SVD, the VAE's loss, save/load round trips, error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from w2wlib.data import save_weights
from w2wlib.errors import ArtifactMissingError, W2WError
from w2wlib.lora import LoraLayout
from w2wlib.spaces import PCASpace, VAEConfig, VAESpace, WeightSpace, active_units, load_space, variance_shares
from w2wlib.spaces.base import CONFIG_FILE, TENSORS_FILE

MODULES = [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64),
           ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 64, 64)]  # rank 1: D = 256


def low_rank(n: int, d: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Standardised-looking rows: a decaying rank-``rank`` signal plus isotropic noise, column-centred."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, rank, generator=g), torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    x = (u * torch.linspace(10, 2, rank)) @ v.T + noise * torch.randn(n, d, generator=g)
    return x - x.mean(0)


def assert_same_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    sign = torch.sign((a * b).sum(0))                                  # [k]
    torch.testing.assert_close(a * sign, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    layout = LoraLayout.from_modules(MODULES, rank=1, alpha=27.0, target_modules=("to_q", "to_v"))
    raw = low_rank(120, layout.dim, 6, 0.1, seed=3) * 0.02 + torch.linspace(-0.1, 0.1, layout.dim)
    return save_weights(tmp_path_factory.mktemp("ds"), raw, layout)


# ---------------------------------------------------------------------- PCA


def test_exact_pca_matches_numpy_svd():
    x = low_rank(80, 50, 6, 0.3)
    k = 8
    space = PCASpace.fit(x, k, method="exact")
    _, s, vt = np.linalg.svd(x.double().numpy(), full_matrices=False)
    ref = torch.from_numpy(vt[:k].T).float()                           # [D, k]
    assert_same_up_to_sign(space.components, ref, atol=1e-5)
    sign = torch.sign((space.components * ref).sum(0))                # [k] the fit's sign of each component
    np.testing.assert_allclose(space.singular_values.numpy(), s[:k], rtol=1e-5)
    coeffs = x.double().numpy() @ vt[:k].T                             # [N, k] reference coefficients
    np.testing.assert_allclose(space.coeff_std.numpy(), coeffs.std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(space.explained_variance_ratio.numpy(), s[:k] ** 2 / (s ** 2).sum(), rtol=1e-5)
    # each coefficient column carries the sign of its component: a sign error in one column fails here
    torch.testing.assert_close(space.encode(x), torch.from_numpy(coeffs).float() * sign, atol=1e-4, rtol=0)


def test_randomized_pca_matches_exact_on_low_rank_plus_noise():
    x = low_rank(300, 200, 8, 0.05, seed=1)
    x = x + 0.3 * x[:1]         # off-centre inside the signal's span: coefficient means of 0.3 to 6, not ~1e-8
    exact = PCASpace.fit(x, 8, method="exact")
    rand = PCASpace.fit(x, 8, method="randomized", batch_size=64, seed=5)
    assert rand.method == "randomized"
    assert exact.coeff_mean.abs().min() > 0.3
    torch.testing.assert_close(rand.singular_values, exact.singular_values, rtol=1e-4, atol=0)
    assert_same_up_to_sign(rand.components, exact.components, atol=1e-3)
    torch.testing.assert_close(rand.coeff_std, exact.coeff_std, rtol=1e-3, atol=0)
    # both fits flip signs the same way (largest entry positive), so the means agree with their signs; the
    # spectral gap (s_8 / s_9 ~ 13) leaves float32 rounding (~3e-6 here) as the only error
    torch.testing.assert_close(rand.coeff_mean, exact.coeff_mean, atol=1e-4, rtol=0)
    assert rand.total_variance == pytest.approx(exact.total_variance, rel=1e-6)


def test_variance_shares_match_numpy_svd_in_both_shapes():
    """The spectrum from the Gram matrix equals the centred matrix's squared singular values, N < D and N > D."""
    for n, d in ((60, 90), (90, 60)):
        x = low_rank(n, d, 5, 0.2, seed=n) + 3.0                       # off-centre: the function centres
        s = np.linalg.svd(x.double().numpy() - x.double().numpy().mean(0), compute_uv=False) ** 2
        np.testing.assert_allclose(variance_shares(x, 10).numpy(), (s / s.sum())[:10], rtol=1e-5, atol=1e-9)
        assert len(variance_shares(x)) == min(n, d)
    exact = PCASpace.fit(x - x.mean(0), 7, method="exact")              # the PCA's own shares, on centred rows
    np.testing.assert_allclose(variance_shares(x, 7).numpy(), exact.explained_variance_ratio.numpy(), rtol=1e-5)
    with pytest.raises(W2WError, match=r"x must be \[N, D\] rows with N >= 2"):
        variance_shares(torch.zeros(1, 4))


def test_full_rank_round_trip_is_exact():
    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    space = PCASpace.fit(x, 25)
    torch.testing.assert_close(space.decode(space.encode(x)), x, atol=2e-5, rtol=0)
    assert float(space.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-5)


def test_pca_from_a_dataset_keeps_its_statistics_and_maps_raw_weights(dataset):
    from w2wlib.data import open_weights

    ds = open_weights(dataset)
    rows = list(range(0, 120, 2))
    space = PCASpace.fit(ds, 6, rows=rows, method="randomized", batch_size=16)
    ref = PCASpace.fit(ds.standardise(ds.rows(rows)), 6, method="exact")
    torch.testing.assert_close(space.singular_values, ref.singular_values, rtol=1e-3, atol=0)
    assert torch.equal(space.mean, ds.mean) and torch.equal(space.std, ds.std)
    raw = ds.rows([1, 3])
    torch.testing.assert_close(space.encode_weights(raw), space.encode(ds.standardise(raw)))
    rebuilt = space.decode_weights(space.encode_weights(raw))       # 6 components of a rank-6 signal + noise
    assert (rebuilt - raw).square().mean() < 0.2 * (raw - ds.mean).square().mean()
    with pytest.raises(W2WError, match="no dataset mean/std"):
        ref.encode_weights(raw)


def test_pca_sampling_follows_each_coefficients_gaussian():
    x = low_rank(200, 30, 4, 0.2)
    space = PCASpace.fit(x, 4)
    z = space.sample(20000, torch.Generator().manual_seed(0), scale=2.0)
    torch.testing.assert_close(z.std(0), 2 * space.coeff_std, rtol=0.03, atol=0)
    torch.testing.assert_close(z.mean(0), space.coeff_mean, atol=0.05 * float(space.coeff_std.max()), rtol=0)
    a = space.sample_weights(3, torch.Generator().manual_seed(1))
    b = space.sample_weights(3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 30) and torch.equal(a, b)
    t = space.truncated(2)
    assert t.latent_dim == 2 and torch.equal(t.components, space.components[:, :2])


def test_interpolate_includes_both_ends_and_is_linear():
    space = PCASpace.fit(torch.randn(30, 10, generator=torch.Generator().manual_seed(0)), 3)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[-1.0, 0.0, 5.0]])
    path = space.interpolate(a, b, 5)
    assert path.shape == (5, 3)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b[0])
    torch.testing.assert_close(path[2], (a + b[0]) / 2)
    with pytest.raises(W2WError, match="steps >= 2"):
        space.interpolate(a, b, 1)
    with pytest.raises(W2WError, match=r"\[N, 3\] latents"):
        space.interpolate(torch.zeros(4), b, 3)


def test_pca_bad_inputs_say_how_to_fix():
    x = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(W2WError, match=r"at most min\(N, D\) = 10: choose 1 <= k <= 10"):
        PCASpace.fit(x, 11)
    with pytest.raises(W2WError, match="method must be"):
        PCASpace.fit(x, 2, method="svd")
    bad = x.clone()
    bad[[3, 7], 2] = float("nan")
    with pytest.raises(W2WError, match=r"Row\(s\) \[3, 7\].*NaN"):
        PCASpace.fit(bad, 2)
    space = PCASpace.fit(x, 2)
    with pytest.raises(W2WError, match="has 9 columns but this PCASpace has D=10"):
        space.encode(x[:, :9])
    with pytest.raises(W2WError, match=r"NaN/inf in 2 row\(s\) \(first \[3, 7\]\)"):
        space.encode(bad)
    with pytest.raises(W2WError, match=r"must be \[N, 2\] latents"):
        space.decode(torch.zeros(3, 5))
    with pytest.raises(W2WError, match="standardised"):
        PCASpace.fit([[1.0, 2.0]], 1)


# ---------------------------------------------------------------------- save / load


def test_pca_save_load_round_trip_is_exact(tmp_path, dataset):
    from w2wlib.data import open_weights

    space = PCASpace.fit(open_weights(dataset), 5)
    space.save(tmp_path / "pca")
    cfg = json.loads((tmp_path / "pca" / CONFIG_FILE).read_text())
    assert cfg["kind"] == "pca" and cfg["w2wlib_version"]
    for loaded in (PCASpace.load(tmp_path / "pca"), load_space(tmp_path / "pca"), WeightSpace.load(tmp_path / "pca")):
        assert isinstance(loaded, PCASpace)
        for name in ("components", "singular_values", "coeff_mean", "coeff_std", "mean", "std"):
            assert torch.equal(getattr(loaded, name), getattr(space, name)), name
        assert (loaded.n_samples, loaded.total_variance, loaded.method) == (space.n_samples, space.total_variance,
                                                                            space.method)
    with pytest.raises(W2WError, match="already exists; pass overwrite=True"):
        space.save(tmp_path / "pca")
    space.truncated(2).save(tmp_path / "pca", overwrite=True)
    assert load_space(tmp_path / "pca").latent_dim == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca"]     # no temporaries left behind


def test_a_failed_save_leaves_the_old_space_untouched(tmp_path, monkeypatch):
    import safetensors.torch

    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    old = PCASpace.fit(x, 3)
    old.save(tmp_path / "pca")

    def disk_full(*args, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        old.truncated(1).save(tmp_path / "pca", overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        old.save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca"]     # nothing half-written, no temporaries
    assert torch.equal(load_space(tmp_path / "pca").components, old.components)


def test_vae_save_load_round_trip_is_exact(tmp_path):
    cfg = VAEConfig(dim=48, hidden=(32, 16), latent=4, norm="layer", residual_blocks=1, activation="silu")
    space = VAESpace(cfg, seed=3)
    space.set_standardisation(torch.randn(48), torch.rand(48) + 0.5)
    space.save(tmp_path / "vae")
    loaded = load_space(tmp_path / "vae")
    assert isinstance(loaded, VAESpace) and loaded.config == cfg
    a, b = space.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.mean, space.mean) and torch.equal(loaded.std, space.std)
    z = torch.randn(3, 4)
    assert torch.equal(loaded.decode(z), space.decode(z))


def test_loading_bad_folders_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(ArtifactMissingError, match="No weight space at .*space.save"):
        load_space(tmp_path / "nowhere")
    PCASpace.fit(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), 2).save(tmp_path / "pca")
    VAESpace(VAEConfig(dim=6, hidden=(4,), latent=2)).save(tmp_path / "vae")
    with pytest.raises(W2WError, match="holds a 'pca' space, not 'vae'.*load_space"):
        VAESpace.load(tmp_path / "pca")
    with pytest.raises(W2WError, match="holds a 'vae' space, not 'pca'"):
        PCASpace.load(tmp_path / "vae")
    data = (tmp_path / "pca" / TENSORS_FILE).read_bytes()
    (tmp_path / "pca" / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(W2WError, match=f"{TENSORS_FILE} is corrupt or truncated"):
        load_space(tmp_path / "pca")
    (tmp_path / "pca" / TENSORS_FILE).write_bytes((tmp_path / "vae" / TENSORS_FILE).read_bytes())
    with pytest.raises(W2WError, match="come from different saves"):
        load_space(tmp_path / "pca")
    (tmp_path / "vae" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(W2WError, match=f"{CONFIG_FILE} is not valid JSON"):
        load_space(tmp_path / "vae")
    (tmp_path / "vae" / CONFIG_FILE).unlink()
    with pytest.raises(ArtifactMissingError, match=f"{CONFIG_FILE} is missing from"):
        load_space(tmp_path / "vae")


# ---------------------------------------------------------------------- moving a space


def _spaces_and_rows():
    x = low_rank(30, 12, 3, 0.1)
    pca = PCASpace.fit(x, 3)
    vae = VAESpace(VAEConfig(dim=12, hidden=(8,), latent=3), seed=2)
    vae.set_standardisation(torch.zeros(12), torch.ones(12))
    return x, pca, vae


def test_to_moves_every_tensor_in_place_and_returns_the_space():
    x, pca, vae = _spaces_and_rows()
    for space, moved in ((pca, pca.truncated(3)), (vae, VAESpace(vae.config, seed=2))):
        z, w = space.encode(x), space.decode(space.encode(x))
        assert space.to("cpu") is space and space.to(torch.device("cpu")) is space
        assert space.device == torch.device("cpu")
        assert torch.equal(space.encode(x), z) and torch.equal(space.decode(z), w)
        assert moved.to("meta") is moved and moved.device.type == "meta"   # meta: every tensor, no data
        tensors = moved._state()[1]
        assert tensors and all(t.is_meta and t.dtype == torch.float32 for t in tensors.values())
        assert moved.encode(x).is_meta and moved.encode(x).shape == (30, 3)
        assert moved.decode(z).is_meta and moved.decode(z).shape == (30, 12)
        assert space.device == torch.device("cpu") and torch.equal(space.encode(x), z)   # the original stays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a space to a GPU and back needs CUDA")
def test_to_cuda_and_back_keeps_encode_and_decode():
    x, pca, vae = _spaces_and_rows()
    for space in (pca, vae):
        z, w = space.encode(x), space.decode(space.encode(x))
        assert space.to("cuda") is space and space.device.type == "cuda"
        zc = space.encode(x)                                           # a CPU input is moved to the space
        assert zc.device.type == "cuda"
        torch.testing.assert_close(zc.cpu(), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(space.decode(zc).cpu(), w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(space.encode_weights(x).cpu(), z, atol=1e-5, rtol=1e-5)
        assert space.to("cpu") is space and space.device.type == "cpu"
        assert torch.equal(space.encode(x), z) and torch.equal(space.decode(z), w)


# ---------------------------------------------------------------------- VAE


def test_vae_presets_mirror_the_seeds_and_scale_down():
    sd = VAEConfig.sd15()
    assert (sd.dim, sd.hidden, sd.latent, sd.activation) == (99_648, (4096, 2048, 1024), 512, "leaky_relu")
    mini = VAEConfig.scaled(5376)
    assert mini.hidden == (224, 112, 56) and mini.latent == 24
    assert VAEConfig.scaled(256, latent=16).hidden == (16, 16, 16)
    with pytest.raises(W2WError, match="norm must be"):
        VAEConfig(dim=10, norm="batch")
    with pytest.raises(W2WError, match="activation must be"):
        VAEConfig(dim=10, activation="swish")


def test_vae_shapes_and_deterministic_encode():
    space = VAESpace(VAEConfig(dim=40, hidden=(24, 12), latent=5, dropout=0.1, input_noise=0.1), seed=0)
    x = torch.randn(7, 40)
    assert space.encode(x).shape == (7, 5) and torch.equal(space.encode(x), space.encode(x))
    assert space.decode(space.sample(3, torch.Generator().manual_seed(0))).shape == (3, 40)
    z = torch.zeros(2, 5, requires_grad=True)
    space.decode(z).sum().backward()                                  # decode is differentiable in z
    assert z.grad is not None and z.grad.abs().sum() > 0
    same = VAESpace(space.config, seed=0).model.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in space.model.state_dict().items())
    with pytest.raises(W2WError, match="has 39 columns but this VAESpace has D=40"):
        space.encode(x[:, :39])


def test_vae_loss_terms_match_a_hand_computation():
    space = VAESpace(VAEConfig(dim=20, hidden=(16,), latent=3), seed=0)
    m, x = space.model.eval(), torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    out = m.loss(x, beta=0.5)
    mu, logvar = m.posterior(x)
    kl = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum(1).mean()
    recon = ((m.decode(mu) - x) ** 2).mean()
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["recon"], recon)
    torch.testing.assert_close(out["loss"], recon + 0.5 * kl / 20)


def test_free_bits_floor_each_latent_dimension():
    space = VAESpace(VAEConfig(dim=20, hidden=(16,), latent=3), seed=0)
    m, x = space.model.eval(), torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, logvar = m.posterior(x)
    kl_dim = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).mean(0)  # [3]
    lam = float(kl_dim.median())
    out = m.loss(x, beta=1.0, free_bits=lam)
    torch.testing.assert_close(out["kl_term"], kl_dim.clamp_min(lam).sum())
    # every dimension under the floor: the KL term is constant, so it sends no gradient to the encoder
    high = float(kl_dim.max()) + 1
    m.zero_grad()
    m.loss(x, beta=1.0, free_bits=high)["loss"].backward()
    with_fb = m.to_stats.weight.grad.clone()
    m.zero_grad()
    m.loss(x, beta=0.0)["loss"].backward()
    torch.testing.assert_close(with_fb, m.to_stats.weight.grad)


def test_active_units_counts_dimensions_with_spread():
    z = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.5, 0.05, 0.0])
    n, var = active_units(z)
    assert n == 2 and var.shape == (4,)
    with pytest.raises(W2WError, match="active_units needs"):
        active_units(torch.zeros(1, 4))


def test_kl_per_dim_sums_to_the_loss_kl_and_flags_collapsed_units():
    space = VAESpace(VAEConfig(dim=20, hidden=(16,), latent=3), seed=0)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    kl = space.kl_per_dim(x)
    assert kl.shape == (3,) and (kl >= 0).all()
    torch.testing.assert_close(kl.sum(), space.model.eval().loss(x)["kl"])
    with torch.no_grad():                        # make unit 1 the prior whatever x: mean 0, log-variance 0
        space.model.to_stats.weight[[1, 4]] = 0.0
        space.model.to_stats.bias[[1, 4]] = 0.0
    kl = space.kl_per_dim(x)
    assert kl[1] == 0 and kl[0] > 0 and kl[2] > 0
    with pytest.raises(W2WError, match="columns"):
        space.kl_per_dim(x[:, :5])


def test_token_vae_maps_modules_saves_exactly_and_learns(tmp_path):
    from w2wlib.train import TrainConfig, train_vae

    cfg = VAEConfig(dim=60, latent=3, arch="tokens", token_sizes=(8, 24, 28), token_width=16, token_layers=1,
                    token_heads=2)
    space = VAESpace(cfg, seed=0)
    x = low_rank(64, 60, rank=3, noise=0.05)
    x = (x - x.mean(0)) / x.std(0)
    assert space.encode(x).shape == (64, 3) and space.decode(space.encode(x)).shape == (64, 60)
    z = torch.zeros(2, 3, requires_grad=True)
    space.decode(z).sum().backward()
    assert z.grad.abs().sum() > 0                                      # differentiable for inversion
    assert len(space.model.encoder.proj) == 3 and space.model.decoder.proj[1].out_features == 24
    before = float(space.model.eval().loss(x)["recon"])
    train_vae(space, x, TrainConfig(steps=60, batch_size=16, warmup=5, beta_warmup=60, beta_ramp=0, val_fraction=0.2,
                                    log_every=20, val_every=60), progress=False)
    assert float(space.model.eval().loss(x)["recon"]) < 0.7 * before
    space.save(tmp_path / "tok")
    loaded = load_space(tmp_path / "tok")
    assert loaded.config == cfg and torch.equal(loaded.decode(z.detach()), space.decode(z.detach()))
    with pytest.raises(W2WError, match="token_sizes"):
        VAEConfig(dim=60, arch="tokens", token_sizes=(8, 24))
    with pytest.raises(W2WError, match="arch must be"):
        VAEConfig(dim=60, arch="conv")


def test_a_linear_vae_learns_what_the_svd_finds_and_a_linear_path_adds_to_the_mlp(tmp_path):
    """hidden=() is a linear VAE: trained at β = 0 it reconstructs as well as the top-k SVD (the reference).

    ``linear_skip`` adds a linear path to the MLP: with the MLP's output zeroed the decoder is exactly it.
    """
    from w2wlib.metrics import reconstruction_mse
    from w2wlib.train import TrainConfig, train_vae

    x = low_rank(512, 40, rank=4, noise=0.3, seed=5)
    x = x / x.std(0)
    train, val = x[:448], x[448:]
    pca_err = float(reconstruction_mse(PCASpace.fit(train, 4), val).mean())
    linear = VAESpace(VAEConfig(dim=40, hidden=(), latent=4), seed=0)
    train_vae(linear, train, TrainConfig(steps=600, batch_size=64, lr=1e-2, warmup=20, beta_warmup=600, beta_ramp=0,
                                         val_fraction=0.1, log_every=100, val_every=600), progress=False)
    vae_err = float(reconstruction_mse(linear, val).mean())
    assert vae_err < 1.05 * pca_err and pca_err < 0.5, (vae_err, pca_err)

    cfg = VAEConfig(dim=40, hidden=(16,), latent=4, linear_skip=True, dropout=0.2)
    space = VAESpace(cfg, seed=1)
    m = space.model
    z = torch.randn(5, 4)
    with torch.no_grad():
        m.out.weight.zero_(), m.out.bias.zero_()
    torch.testing.assert_close(space.decode(z), m.skip_out(z), rtol=0, atol=0)
    space.save(tmp_path / "skip")
    loaded = load_space(tmp_path / "skip")
    assert loaded.config == cfg and torch.equal(loaded.encode(val), space.encode(val))
