"""When does KL annealing matter? The same VAE trained under several β schedules, at two strengths.

The comparison of the chapter "Training the VAE", recorded in full by ``benchmarks/beta_schedules.py``
(``benchmarks/beta_schedules.json``) and re-run in part by the chapter. The KL term of
:class:`~w2wlib.spaces.WeightVAE` is divided by D, so β = 1 is the ELBO of a unit-variance decoder;
β = D is a loss that adds the summed KL to a *mean* squared error. Six runs of one recipe, shortened to
``steps``: β constant, warm-up + linear ramp (Bowman et al. 2016) and cyclical (Fu et al. 2019), and at
β = D the ramp with free bits (Kingma et al. 2016).

Example:
    >>> runs = schedule_runs(TrainConfig(), steps=1000)                          # doctest: +SKIP
    >>> results = compare_schedules(vae_cfg, ds, {n: runs[n] for n in LIVE})     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .errors import W2WError
from .train import TrainConfig, train_vae

__all__ = ["SCHEDULES", "schedule_runs", "compare_schedules", "plot_schedules", "schedule_rows", "largest_gap"]

# Named by the final β (1 or D) and the schedule; no "=" in a name, so that a notebook's parameters can list them.
SCHEDULES = ("β 1, constant", "β 1, warm-up + linear", "β D, constant", "β D, warm-up + linear",
             "β D, cyclical", "β D, warm-up + linear, free bits 0.5")
_MIN_NATS = 0.1   # a latent unit holds information about the identity when its KL from the prior is above this


def schedule_runs(recipe: TrainConfig, steps: int, dim: int) -> dict[str, TrainConfig]:
    """The six configs of :data:`SCHEDULES`: ``recipe`` shortened to ``steps`` (warm-up and ramp a quarter
    each), β up to 1 or up to ``dim`` (D, the dataset's numbers per identity)."""
    if steps < 4:
        raise W2WError(f"steps={steps}: the schedules need at least 4 steps (a warm-up and a ramp of steps // 4)")
    short = dataclasses.replace(recipe, steps=steps, warmup=min(recipe.warmup, steps // 10), beta_warmup=steps // 4,
                                beta_ramp=steps // 4, val_every=max(1, steps // 10), log_every=max(1, steps // 40))
    big = dict(beta_max=float(dim))
    return dict(zip(SCHEDULES, (
        dataclasses.replace(short, beta_schedule="constant"),
        short,
        dataclasses.replace(short, beta_schedule="constant", **big),
        dataclasses.replace(short, **big),
        dataclasses.replace(short, beta_schedule="cyclical", **big),
        dataclasses.replace(short, free_bits=0.5, **big))))


def compare_schedules(vae_config, data, runs: Mapping[str, TrainConfig], *, seed: int = 0, device="cpu",
                      progress: bool = False) -> dict[str, dict[str, Any]]:
    """Train a fresh VAE (``vae_config``, init ``seed``) under each config on ``data`` (a WeightsDataset).

    Returns ``{name: {"history": [...], "informative": units whose held-out KL > 0.1 nats, "latent": k}}``.
    """
    from .spaces import VAESpace

    out = {}
    for name, cfg in runs.items():
        space = VAESpace(vae_config, seed=seed).to(device)
        history = train_vae(space, data, cfg, progress=progress)
        x_val = data.standardise(data.rows(cfg.split(len(data))[1]))
        out[name] = {"history": history, "informative": int((space.kl_per_dim(x_val) > _MIN_NATS).sum()),
                     "latent": vae_config.latent}
    return out


def schedule_rows(results: Mapping[str, Mapping[str, Any]], suffix: str = "") -> list[list]:
    """Table rows: schedule, held-out MSE, KL, active units, units over 0.1 nats (last validation of each run)."""
    rows = []
    for name, r in results.items():
        last = next(h for h in reversed(r["history"]) if "val_recon" in h)
        rows.append([name + suffix, f"{last['val_recon']:.4f}", f"{last['val_kl']:.1f}",
                     f"{last['val_active_units']} of {r['latent']}", r["informative"]])
    return rows


def largest_gap(live: Mapping[str, Mapping[str, Any]], recorded: Mapping[str, Mapping[str, Any]]) -> float:
    """The largest difference of held-out MSE between live runs and their recorded namesakes, step by step
    (0 when a live run retraces its record; the same seed gives the same numbers on the same machine)."""
    val = lambda r: {h["step"]: h["val_recon"] for h in r["history"] if "val_recon" in h}
    gaps = [abs(a - val(recorded[n])[s]) for n in live if n in recorded for s, a in val(live[n]).items()
            if s in val(recorded[n])]
    if not gaps:
        raise W2WError("no live run shares a validation step with its record: run the record's steps")
    return max(gaps)


def plot_schedules(recorded: Mapping[str, Mapping[str, Any]], live: Mapping[str, Mapping[str, Any]] | None = None):
    """Held-out MSE and active units along training: recorded runs as lines, live re-runs as crosses."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    for i, (name, r) in enumerate(recorded.items()):
        v = [h for h in r["history"] if "val_recon" in h]
        ax1.plot([h["step"] for h in v], [h["val_recon"] for h in v], "o-", ms=3, color=f"C{i}", label=name)
        ax2.plot([h["step"] for h in v], [h["val_active_units"] for h in v], "o-", ms=3, color=f"C{i}", label=name)
    for name, r in (live or {}).items():
        v = [h for h in r["history"] if "val_recon" in h]
        i = list(recorded).index(name) if name in recorded else len(recorded)
        ax1.plot([h["step"] for h in v], [h["val_recon"] for h in v], "x", ms=9, color=f"C{i}", label=f"{name} (live)")
        ax2.plot([h["step"] for h in v], [h["val_active_units"] for h in v], "x", ms=9, color=f"C{i}")
    ax1.set(xlabel="step", ylabel="held-out reconstruction MSE")
    ax2.set(xlabel="step", ylabel="active latent units")
    ax1.legend(fontsize=6)
    fig.tight_layout()
    return fig
