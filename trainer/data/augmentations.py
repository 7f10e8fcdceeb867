"""Multi-crop augmentation on the device, batched: random resized crops, flips and intensity jitter.

One `grid_sample` per view crops, resizes and flips the whole batch at once. Views are returned in
the DINOv2 collate layout: global crops [2·B, c, G, G] (view-major), local crops [n·B, c, L, L].

Scale-aware crops (`crops.pixel_size_um`, µm per pixel): sources image at different pixel sizes (Phenix
0.598 µm, ImageXpress 0.703 µm, …), so the same crop fraction covers different tissue. With a reference pixel
size p, a field of pixel size p_b gets crop sides × p / p_b: every crop covers what it would on a field
imaged at p, and a cell is as many output pixels wide whatever the microscope. Sides stay within the field
(a crop that would be larger is the whole field); fields of unknown pixel size are cropped as without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.errors import TrainerError

CHANNEL_AS_VIEW = "channel_as_view"
ALL_CHANNELS = "all_channels"


class MultiCropAugmentation:
    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int,
                 global_crops_size: int = 224, local_crops_size: int = 96,
                 mode: str = CHANNEL_AS_VIEW, local_mean_probability: float = 0.3,
                 flip_probability: float = 0.5, intensity_jitter: float = 0.2, pixel_size_um: float | None = None):
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.mode = mode
        self.local_mean_probability = local_mean_probability
        self.flip_probability = flip_probability
        self.intensity_jitter = intensity_jitter
        self.pixel_size_um = pixel_size_um

    def __call__(self, images: torch.Tensor, generator: torch.Generator, samples_per_field: int = 1,
                 pixel_size_um=None) -> dict[str, torch.Tensor]:
        """images: normalised float [B, C, H, W] on the device; `generator` (CPU) draws every choice.

        `samples_per_field` K > 1 draws K independent crop sets from every field: the views hold K·B
        samples, sample k·B + b being the k-th crop set of field b (the same index in every view).
        `pixel_size_um` [B] (the batch's, NaN where unknown) makes crops scale-aware when the augmentation
        has a reference pixel size.
        """
        B, C = images.shape[:2]
        self._zoom = self.zoom(pixel_size_um, B)
        least = float(self._zoom.min()) if self._zoom is not None else 1.0
        global_sources = self._view_sources(_antialias(images, self.global_crops_scale, self.global_crops_size, least))
        local_sources = self._view_sources(_antialias(images, self.local_crops_scale, self.local_crops_size, least))
        global_views: list[list[torch.Tensor]] = [[], []]
        local_views: list[list[torch.Tensor]] = [[] for _ in range(self.local_crops_number)]
        for _ in range(samples_per_field):
            global_choice = [torch.full((B,), C), torch.randint(0, C, (B,), generator=generator)]
            for view, choice in zip(global_views, global_choice):
                view.append(self._crop(global_sources, choice, self.global_crops_scale, self.global_crops_size,
                                       generator))
            for view in local_views:
                view.append(self._crop(local_sources, self._local_choice(B, C, generator), self.local_crops_scale,
                                       self.local_crops_size, generator))
        out = {"global_crops": torch.cat([c for view in global_views for c in view]), "n_global": 2,
               "n_local": self.local_crops_number}
        out["local_crops"] = torch.cat([c for view in local_views for c in view]) if local_views else None
        return out

    def zoom(self, pixel_size_um, B: int) -> torch.Tensor | None:
        """Per field, the factor on crop sides: reference / field pixel size (1 where unknown); None when
        crops are not scale-aware."""
        if self.pixel_size_um is None or pixel_size_um is None:
            return None
        sizes = torch.as_tensor(pixel_size_um, dtype=torch.float32).reshape(-1)
        if len(sizes) != B:
            raise ValueError(f"pixel_size_um has {len(sizes)} values for a batch of {B} fields")
        known = torch.isfinite(sizes) & (sizes > 0)
        return torch.where(known, self.pixel_size_um / torch.where(known, sizes, 1.0), 1.0)

    def _view_sources(self, images: torch.Tensor) -> torch.Tensor:
        """channel_as_view: the C channels plus their mean as channel C; all_channels: unchanged."""
        if self.mode == ALL_CHANNELS:
            return images
        return torch.cat([images, images.mean(dim=1, keepdim=True)], dim=1)

    def _local_choice(self, B: int, C: int, generator: torch.Generator) -> torch.Tensor:
        channel = torch.randint(0, C, (B,), generator=generator)
        use_mean = torch.rand(B, generator=generator) < self.local_mean_probability
        return torch.where(use_mean, torch.full_like(channel, C), channel)

    def _crop(self, sources: torch.Tensor, choice: torch.Tensor, scale: tuple[float, float], size: int,
              generator: torch.Generator) -> torch.Tensor:
        B = sources.shape[0]
        if self.mode == CHANNEL_AS_VIEW:
            sources = sources[torch.arange(B), choice.to(sources.device)].unsqueeze(1)
        theta = _random_resized_crop_theta(B, scale, self.flip_probability, generator, self._zoom).to(sources.device)
        grid = F.affine_grid(theta, [B, sources.shape[1], size, size], align_corners=False)
        crops = F.grid_sample(sources, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self._jitter(crops, generator)

    def _jitter(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.intensity_jitter <= 0:
            return crops
        B, c = crops.shape[:2]
        j = self.intensity_jitter
        gain = 1 + (torch.rand(B, c, 1, 1, generator=generator) * 2 - 1) * j
        shift = (torch.rand(B, c, 1, 1, generator=generator) * 2 - 1) * j
        return crops * gain.to(crops.device) + shift.to(crops.device)


def _antialias(images: torch.Tensor, scale: tuple[float, float], size: int, zoom: float = 1.0) -> torch.Tensor:
    """Average-pool by the largest integer factor every crop of this scale range still allows.

    Bilinear sampling of a 1080-pixel field into 224 pixels would alias; pooling first keeps each
    output pixel an average of the input pixels it covers, and makes the sampling cheaper. `zoom`: the
    smallest factor on crop sides in the batch (scale-aware crops).
    """
    smallest_side = math.sqrt(scale[0] * 3 / 4) * min(images.shape[-2:]) * min(1.0, zoom)
    factor = int(smallest_side // size)
    return F.avg_pool2d(images, factor) if factor >= 2 else images


def _random_resized_crop_theta(B: int, scale: tuple[float, float], flip_probability: float,
                               generator: torch.Generator, zoom: torch.Tensor | None = None) -> torch.Tensor:
    """Affine maps from output to input coordinates ([-1, 1]): area in `scale`, aspect 3/4–4/3; sides
    × `zoom` per sample (scale-aware crops). The same draws with or without zoom."""
    area = scale[0] + torch.rand(B, generator=generator) * (scale[1] - scale[0])
    log_ratio = math.log(3 / 4) + torch.rand(B, generator=generator) * (math.log(4 / 3) - math.log(3 / 4))
    ratio = torch.exp(log_ratio)
    side = zoom if zoom is not None else 1.0
    w = (torch.sqrt(area * ratio) * side).clamp(max=1.0)
    h = (torch.sqrt(area / ratio) * side).clamp(max=1.0)
    cx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, generator=generator) < flip_probability, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def make_augmentation(cfg: dict) -> MultiCropAugmentation:
    crops = cfg["crops"]
    return MultiCropAugmentation(
        global_crops_scale=crops["global_crops_scale"],
        local_crops_scale=crops["local_crops_scale"],
        local_crops_number=crops["local_crops_number"],
        global_crops_size=crops["global_crops_size"],
        local_crops_size=crops["local_crops_size"],
        mode=cfg["train"]["multiview_mode"],
        local_mean_probability=crops["local_mean_probability"],
        flip_probability=crops["flip_probability"],
        intensity_jitter=crops["intensity_jitter"],
        pixel_size_um=_reference_pixel_size(crops.get("pixel_size_um")),
    )


def _reference_pixel_size(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise TrainerError(f"crops.pixel_size_um must be null (crops as fractions of the field) or the µm per "
                           f"pixel crop scales refer to (e.g. 0.65), got {value!r}")
    return float(value)
