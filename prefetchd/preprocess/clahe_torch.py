"""CLAHE in torch, for CPU and CUDA tensors (the trainer's `clahe.where: trainer` path).

Same semantics and the same float32 arithmetic as `prefetchd.preprocess.clahe` (within 1 of 65,535 on any
device; on CPU it is normally bit-identical). Batched over leading dimensions: every [H, W] plane gets its
own tiles and tables.
"""

from __future__ import annotations

import torch

from prefetchd.preprocess.clahe import MAX_BINS, check_params, geometry, preblend


def _reflect101(n: int, pad: int, device) -> torch.Tensor:
    """Indices of rows 0..n+pad-1 under OpenCV's BORDER_REFLECT_101 (repeated for pads longer than n)."""
    idx = torch.arange(n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    m = idx % period
    return torch.where(m < n, m, period - m)


def _weights(n: int, tile: int, tiles: int, device):
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(tile), dtype=torch.float32)
    t = torch.arange(n, dtype=torch.float32, device=device) * inv.to(device) - 0.5
    t1 = torch.floor(t)
    w = t - t1
    w1 = 1.0 - w
    i1 = t1.to(torch.int64).clamp(min=0)
    i2 = (t1.to(torch.int64) + 1).clamp(max=tiles - 1)
    return i1, i2, w, w1


def clahe_torch(x: torch.Tensor, clip_limit: float = 3.0, tile_grid=8, bins: int = 256) -> torch.Tensor:
    """CLAHE of `x` [..., H, W] (uint16, an integer type, or float holding values in [0, 65535]).

    Returns uint16 for integer input, float32 (integer-valued, 0..65535) for float input, on x's device.
    """
    if x.dim() < 2:
        raise ValueError(f"clahe_torch needs [..., H, W], got shape {tuple(x.shape)}")
    bins = int(bins)
    check_params(clip_limit, tile_grid, bins)
    dev = x.device
    lead = x.shape[:-2]
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if x.is_floating_point():
        v = x.reshape(-1, H, W).to(torch.float32).round().clamp(0, 65535).to(torch.int64)
    else:
        v = x.reshape(-1, H, W).to(torch.int32).to(torch.int64) & 0xFFFF if x.dtype == torch.int16 \
            else x.reshape(-1, H, W).to(torch.int64).clamp(0, 65535)
    N = v.shape[0]
    g = geometry(H, W, clip_limit, tile_grid, bins)
    T = g.tiles_x * g.tiles_y

    # ---- tables
    padded = v
    if g.pad_bottom or g.pad_right:
        padded = v.index_select(1, _reflect101(H, g.pad_bottom, dev)).index_select(2, _reflect101(W, g.pad_right, dev))
    tiles = padded.reshape(N, g.tiles_y, g.tile_h, g.tiles_x, g.tile_w).permute(0, 1, 3, 2, 4).reshape(N * T, -1)
    b = tiles if bins == MAX_BINS else torch.div(tiles * (bins - 1) + 32767, 65535, rounding_mode="floor")
    b = b + (torch.arange(N * T, device=dev, dtype=torch.int64) * bins)[:, None]
    hist = torch.bincount(b.reshape(-1), minlength=N * T * bins).reshape(N * T, bins).to(torch.int64)
    if g.clip > 0:
        excess = (hist - g.clip).clamp(min=0).sum(dim=1)
        hist = hist.clamp(max=g.clip)
        redist = torch.div(excess, bins, rounding_mode="floor")
        residual = excess - redist * bins
        hist = hist + redist[:, None]
        step = torch.clamp(torch.div(bins, residual.clamp(min=1), rounding_mode="floor"), min=1)
        idx = torch.arange(bins, device=dev, dtype=torch.int64)[None, :]
        add = (residual[:, None] > 0) & (idx % step[:, None] == 0) & (torch.div(idx, step[:, None], rounding_mode="floor") < residual[:, None])
        hist = hist + add.to(torch.int64)
    cdf = torch.cumsum(hist, dim=1).to(torch.float32)
    lut = torch.round(cdf * torch.tensor(g.lut_scale, dtype=torch.float32, device=dev)).clamp(0, 65535)
    diff = torch.zeros_like(lut)
    diff[:, :-1] = lut[:, 1:] - lut[:, :-1]
    lut = lut.reshape(N, g.tiles_y, g.tiles_x * bins)
    diff = diff.reshape(N, g.tiles_y, g.tiles_x * bins)

    # ---- interpolation
    num = v * (bins - 1)
    b0 = torch.div(num, 65535, rounding_mode="floor")
    f = (num - b0 * 65535).to(torch.float32) * (torch.tensor(1.0) / torch.tensor(65535.0)).to(dev)
    xi1, xi2, xa, xa1 = _weights(W, g.tile_w, g.tiles_x, dev)
    yi1, yi2, ya, ya1 = _weights(H, g.tile_h, g.tiles_y, dev)
    if preblend(W, g.tiles_x, bins):
        rv = lut[:, yi1] * ya1[None, :, None] + lut[:, yi2] * ya[None, :, None]     # [N, H, tiles_x * bins]
        rd = diff[:, yi1] * ya1[None, :, None] + diff[:, yi2] * ya[None, :, None]

        def m(xi):
            k = (xi * bins)[None, None, :] + b0
            return torch.gather(rv, 2, k) + f * torch.gather(rd, 2, k)

        res = m(xi1) * xa1 + m(xi2) * xa
    else:
        lf = lut.reshape(N, T * bins)
        df = diff.reshape(N, T * bins)

        def m(yi, xi):
            k = ((yi * g.tiles_x)[:, None] + xi[None, :]) * bins + b0
            k = k.reshape(N, -1)
            return (torch.gather(lf, 1, k) + f.reshape(N, -1) * torch.gather(df, 1, k)).reshape(N, H, W)

        res = (m(yi1, xi1) * xa1 + m(yi1, xi2) * xa) * ya1[:, None] + \
            (m(yi2, xi1) * xa1 + m(yi2, xi2) * xa) * ya[:, None]
    res = torch.round(res).clamp(0, 65535)
    if x.is_floating_point():
        return res.reshape(*lead, H, W)
    return res.to(torch.int32).to(torch.uint16).reshape(*lead, H, W)
