"""Data on the device: uint16 → float without 8 bits, per-channel normalisation, multi-crop views."""

import warnings

import numpy as np
import pytest
import torch

from trainer.data.augmentations import MultiCropAugmentation
from trainer.data.synthetic import SyntheticSource
from trainer.data.to_device import images_to_device, normalize_per_channel


def _gradient_batch(B=2, C=3, H=96, W=96):
    ramp = np.linspace(1000, 9000, H * W).reshape(H, W)
    images = np.stack([np.stack([ramp * (c + 1) / C for c in range(C)]) for _ in range(B)]).astype(np.uint16)
    images.flags.writeable = False
    return images


def test_read_only_uint16_batches_become_float_without_warning_or_8_bit_squash():
    images = _gradient_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = images_to_device(images, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert torch.equal(x, torch.from_numpy(images.astype(np.float32)))
    assert len(torch.unique(x[0, 0])) > 1000


def test_normalisation_is_per_image_and_per_channel():
    x = normalize_per_channel(images_to_device(_gradient_batch(), torch.device("cpu")))
    mean, std = x.mean(dim=(-2, -1)), x.std(dim=(-2, -1))
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def _augment(mode, **kw):
    args = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=3,
                global_crops_size=32, local_crops_size=16, mode=mode)
    args.update(kw)
    return MultiCropAugmentation(**args)


@pytest.mark.parametrize("mode, channels", [("channel_as_view", 1), ("all_channels", 3)])
def test_multicrop_shapes_follow_the_dinov2_layout(mode, channels):
    x = normalize_per_channel(images_to_device(_gradient_batch(B=4), torch.device("cpu")))
    crops = _augment(mode)(x, torch.Generator().manual_seed(0))
    assert crops["global_crops"].shape == (2 * 4, channels, 32, 32)
    assert crops["local_crops"].shape == (3 * 4, channels, 16, 16)
    assert crops["n_global"] == 2 and crops["n_local"] == 3


def test_crops_are_reproducible_from_the_generator_and_keep_16_bit_precision():
    x = images_to_device(_gradient_batch(), torch.device("cpu"))
    augment = _augment("all_channels", intensity_jitter=0.0, flip_probability=0.0)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a["global_crops"], b["global_crops"])
    assert not torch.equal(a["global_crops"], c["global_crops"])
    assert len(torch.unique(a["global_crops"][0, 0])) > 256


def test_channel_as_view_first_global_view_is_the_channel_mean():
    x = normalize_per_channel(images_to_device(_gradient_batch(H=64, W=64), torch.device("cpu")))
    augment = _augment("channel_as_view", global_crops_scale=(1.0, 1.0), global_crops_size=64,
                       intensity_jitter=0.0, flip_probability=0.0)
    crops = augment(x, torch.Generator().manual_seed(0))
    # A full-field crop at the field's own size samples pixel centres exactly (up to aspect jitter).
    mean = x.mean(dim=1, keepdim=True)
    first = crops["global_crops"][:2]
    assert torch.corrcoef(torch.stack([first.flatten(), mean.flatten()]))[0, 1] > 0.99
    second = crops["global_crops"][2:]
    per_channel = [torch.corrcoef(torch.stack([second[0].flatten(), x[0, c].flatten()]))[0, 1] for c in range(3)]
    assert max(per_channel) > 0.99


def test_synthetic_source_serves_the_daemon_schedule_in_batches():
    source = SyntheticSource(n_fields=10, size=16, channels=5, batch_size=4, seed=1)
    batches = list(source.epoch(0))
    assert source.batches_per_epoch == 3 == len(batches)
    assert [len(b.ids) for b in batches] == [4, 4, 2]
    assert batches[0].images.dtype == np.uint16 and not batches[0].images.flags.writeable
    resumed = list(source.epoch(0, start_batch=1))
    assert resumed[0].ids == batches[1].ids


def _micron_ramp(pixel_size_um: float, size: int = 240) -> torch.Tensor:
    """A field whose value at each pixel is its x position in µm: a crop's slope is µm per output pixel."""
    x = torch.arange(size, dtype=torch.float32) * pixel_size_um
    return x.expand(1, 1, size, size).clone()


def _microns_per_output_pixel(augment, pixel_size_um: float) -> float:
    crops = augment(_micron_ramp(pixel_size_um), torch.Generator().manual_seed(3),
                    pixel_size_um=np.array([pixel_size_um], np.float32))
    g = crops["global_crops"]
    return float((g[..., 1:] - g[..., :-1]).mean())


def test_scale_aware_crops_cover_the_same_microns_whatever_the_pixel_size():
    kw = dict(intensity_jitter=0.0, flip_probability=0.0, global_crops_scale=(0.2, 0.3))
    aware = _augment("all_channels", pixel_size_um=0.65, **kw)
    phenix, coarse = _microns_per_output_pixel(aware, 0.598), _microns_per_output_pixel(aware, 0.8)
    assert phenix == pytest.approx(coarse, rel=2e-3)
    plain = _augment("all_channels", **kw)   # crops as fractions of the field: µm per pixel follows the microscope
    assert _microns_per_output_pixel(plain, 0.8) / _microns_per_output_pixel(plain, 0.598) == pytest.approx(0.8 / 0.598, rel=2e-3)
    # the reference scale itself: a 0.65 µm field is cropped as without it
    assert _microns_per_output_pixel(aware, 0.65) == pytest.approx(_microns_per_output_pixel(plain, 0.65), rel=1e-6)


def test_fields_of_unknown_pixel_size_are_cropped_as_without_scale_awareness():
    kw = dict(intensity_jitter=0.0, flip_probability=0.0)
    x = _micron_ramp(0.7).expand(2, 1, 240, 240)
    a = _augment("all_channels", pixel_size_um=0.65, **kw)(x, torch.Generator().manual_seed(1),
                                                           pixel_size_um=np.array([np.nan, np.nan], np.float32))
    b = _augment("all_channels", **kw)(x, torch.Generator().manual_seed(1))
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])


def test_reference_pixel_size_is_validated_in_one_line():
    from trainer.data.augmentations import make_augmentation
    from trainer.config import load_config
    from trainer.errors import TrainerError

    cfg = load_config(None, ["crops.pixel_size_um=0.65"], require=False)
    assert make_augmentation(cfg).pixel_size_um == 0.65
    with pytest.raises(TrainerError, match="crops.pixel_size_um must be null"):
        make_augmentation(load_config(None, ["crops.pixel_size_um=-1"], require=False))
