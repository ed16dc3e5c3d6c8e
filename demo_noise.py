"""Pictures of the diffusion math (model/diffusion.py): the SD2 schedule, DDIM timesteps and
the multi-resolution noise of App. A.1 at several t. Writes PNGs under out/noise/."""
import os

import numpy as np
import torch

from model.diffusion import ddim_timesteps, multires_noise, scaled_linear_alphas_cumprod
from plot import image_grid, line_plot


def main(out="out/noise"):
    os.makedirs(out, exist_ok=True)
    ab = scaled_linear_alphas_cumprod()
    t = np.arange(1000)
    line_plot(f"{out}/schedule.png", {"alpha_bar_t": (t, ab.numpy()), "1 - alpha_bar_t": (t, 1 - ab.numpy())},
              title="SD2 scaled_linear schedule (Eq. 5)", xlabel="t")
    for spacing in ("leading", "trailing"):
        print(f"DDIM {spacing:8s} S=1: {ddim_timesteps(1, spacing=spacing).tolist()}  "
              f"S=4: {ddim_timesteps(4, spacing=spacing).tolist()}")
    ts = [0, 250, 500, 750, 999]
    tiles, labels = [], []
    for kind, kw in (("gaussian", None), ("multires", dict(annealed=False)), ("annealed", dict(annealed=True))):
        for tt in ts:
            g = torch.Generator().manual_seed(0)
            eps = torch.randn(1, 4, 64, 64, generator=g) if kw is None else multires_noise((1, 4, 64, 64), tt, generator=g, **kw)
            tiles.append((eps[0, 0].numpy() / 6 + 0.5))
            labels.append(f"{kind} t={tt}")
    image_grid(f"{out}/multires_noise.png", tiles, labels, cols=len(ts))
    print(f"wrote {out}/schedule.png and {out}/multires_noise.png")


if __name__ == "__main__":
    main()
