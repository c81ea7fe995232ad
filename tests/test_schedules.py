"""The β-schedule comparison: its six configs, a run on the shipped dataset, the retrace check, its table and figure."""

from __future__ import annotations

import pytest

from w2wlib import W2WError
from w2wlib.schedules import SCHEDULES, compare_schedules, largest_gap, plot_schedules, schedule_rows, schedule_runs
from w2wlib.train import TrainConfig, beta_at


def test_schedule_runs_shorten_the_recipe_and_set_each_beta():
    runs = schedule_runs(TrainConfig(), steps=400, dim=5376)
    assert tuple(runs) == SCHEDULES
    assert all(c.steps == 400 and c.beta_warmup == 100 and c.beta_ramp == 100 and c.warmup == 40 for c in runs.values())
    final = {name: beta_at(399, c) for name, c in runs.items()}
    assert final == {SCHEDULES[0]: 1.0, SCHEDULES[1]: 1.0, SCHEDULES[2]: 5376.0, SCHEDULES[3]: 5376.0,
                     SCHEDULES[4]: 5376.0, SCHEDULES[5]: 5376.0}
    assert beta_at(0, runs[SCHEDULES[2]]) == 5376.0 and beta_at(0, runs[SCHEDULES[3]]) == 0.0   # constant vs warm-up
    assert runs[SCHEDULES[4]].beta_schedule == "cyclical" and runs[SCHEDULES[5]].free_bits == 0.5
    with pytest.raises(W2WError, match="the schedules need at least 4 steps"):
        schedule_runs(TrainConfig(), steps=3, dim=10)


def test_a_run_retraces_itself_and_fills_the_table(S):
    """Two runs of one schedule on the shipped dataset give the same history: the live-against-record check is 0."""
    cfg = S.config
    vae_cfg = cfg.vae_config(S.dataset.dim, S.dataset.lora_layout())
    runs = schedule_runs(cfg.train_config(), steps=8, dim=S.dataset.dim)
    one = {SCHEDULES[3]: runs[SCHEDULES[3]]}
    a = compare_schedules(vae_cfg, S.dataset, one, seed=cfg.seed)
    b = compare_schedules(vae_cfg, S.dataset, one, seed=cfg.seed)
    assert largest_gap(a, b) == 0.0
    assert 0 <= a[SCHEDULES[3]]["informative"] <= vae_cfg.latent
    row = schedule_rows(a, " (live)")[0]
    assert row[0] == SCHEDULES[3] + " (live)" and row[3] == f"{a[SCHEDULES[3]]['history'][-1]['val_active_units']} of 64"
    assert len(plot_schedules(b, a).axes) == 2
    with pytest.raises(W2WError, match="no live run shares a validation step"):
        largest_gap(a, {SCHEDULES[0]: b[SCHEDULES[3]]})
