"""Benchmark: batched multi-identity DreamBooth-LoRA against the one-at-a-time peft loop (issue #4, item 7).

Both train rank-1 LoRAs (alpha 27, ``to_q``/``to_v``) on the shipped mini pipeline with the same
config: the same images, prior-preservation pool, steps, learning rate and per-identity random draws
(:func:`w2wlib.dreambooth.draw_step`). The baseline is the loop a user of diffusers' DreamBooth-LoRA
script runs once per identity: wrap the UNet with peft, then a forward/backward/AdamW step on one
instance and one class sample per step. The batched trainer puts G identities in one forward.

Prints identities per hour for both, their ratio, and the mean per-identity loss over the last steps
(equal steps must give equal final loss: same objective, same draws). Run from the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dreambooth_batched.py --steps 40 --batched 64 --solo 4
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from w2wlib.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=str(load_profile().path("world_dir")))
    ap.add_argument("--steps", type=int, default=40, help="DreamBooth steps per identity (both methods)")
    ap.add_argument("--batched", type=int, default=64, help="identities in the batched run (one forward)")
    ap.add_argument("--solo", type=int, default=4, help="identities trained one at a time with peft")
    ap.add_argument("--tail", type=int, default=10, help="final steps whose loss is averaged")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from w2wlib import dreambooth as D
    from w2wlib.lora import LoraLayout
    from w2wlib.lora_io import vector_to_state_dict
    from w2wlib.viz import to_tensor
    from w2wlib.world.pipeline import load_pipeline, make_schedulers
    from w2wlib.world.render import identity_views

    pipe = load_pipeline(f"{args.world}/pipeline")
    ddpm = make_schedulers()[0]
    cfg = D.DreamBoothConfig(steps=args.steps, images_per_identity=4, class_images=32)
    keys = list(range(1, args.batched + 1))
    images = to_tensor(identity_views(keys, cfg.images_per_identity)).view(len(keys), cfg.images_per_identity, 3, 64, 64)
    cls = to_tensor(identity_views([10**9 + 5], cfg.class_images))   # a fixed class pool (same for both)
    layout = LoraLayout.from_unet(pipe.unet, cfg.target, cfg.rank, cfg.alpha)
    print(f"torch threads {torch.get_num_threads()}, D = {layout.dim:,}, {args.steps} steps per identity")

    # --- batched: all identities in one forward per step
    tail = []
    t0 = time.perf_counter()
    D.train_identities(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, ddpm, images, cls, cfg,
                       identity_keys=keys, progress=False,
                       on_step=lambda s, l: tail.append(l) if s >= args.steps - args.tail else None)
    t_batched = time.perf_counter() - t0
    loss_batched = torch.stack(tail).mean(0)                                   # [G]

    # --- baseline: peft, one identity at a time, same draws
    unet, vae = pipe.unet.eval().requires_grad_(False), pipe.vae.eval()
    emb = D.encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.instance_prompt, cfg.class_prompt])
    solo_losses = []
    t0 = time.perf_counter()
    for g in range(args.solo):
        with torch.no_grad():
            inst = D.encode_images(vae, images[g])                             # [K, 4, 8, 8]
            cls_lat = D.encode_images(vae, cls)                                # [M, 4, 8, 8]
        model = get_peft_model(copy.deepcopy(unet), LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                                               target_modules=list(cfg.target)))
        w0 = D.init_lora_bank(layout, [keys[g]], cfg.seed, shared=cfg.shared_init)[0]
        res = set_peft_model_state_dict(model, vector_to_state_dict(w0, layout, prefix="base_model.model."))
        assert not res.unexpected_keys, res.unexpected_keys                   # the init really loaded
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
        losses = []
        for step in range(args.steps):
            d = D.draw_step(cfg, keys[g], step, len(inst), len(cls_lat), inst.shape[1:], ddpm.config.num_train_timesteps)
            x0 = torch.cat([inst[d.instance_idx], cls_lat[d.class_idx]])
            pred = model(ddpm.add_noise(x0, d.noise, d.timesteps), d.timesteps, encoder_hidden_states=emb).sample
            err = (pred - d.noise).pow(2).flatten(1).mean(1)
            loss = err[0] + cfg.prior_loss_weight * err[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if step >= args.steps - args.tail:
                losses.append(loss.item())
        solo_losses.append(np.mean(losses))
    t_solo = time.perf_counter() - t0

    rate_b, rate_s = args.batched / t_batched * 3600, args.solo / t_solo * 3600
    print(f"batched ({args.batched} identities in one forward): {t_batched:7.1f} s  ->  {rate_b:9.0f} identities/hour")
    print(f"peft loop (one identity at a time, {args.solo} run): {t_solo:7.1f} s  ->  {rate_s:9.0f} identities/hour")
    print(f"speed-up (identities per hour, batched / peft loop): {rate_b / rate_s:.1f}x")
    print(f"final loss (mean of the last {args.tail} steps), first {args.solo} identities: "
          f"batched {loss_batched[:args.solo].mean():.4f}, peft loop {np.mean(solo_losses):.4f}; "
          f"all {args.batched} batched: {loss_batched.mean():.4f}")


if __name__ == "__main__":
    main()
