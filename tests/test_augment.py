import colorsys

import pytest
import torch

from rrcm.augment import (
    PretrainViews,
    _hue,
    color_jitter,
    finetune_view,
    gaussian_blur,
    grayscale,
    random_flip,
    random_grayscale,
    random_resized_crop,
    resize_center_crop,
    solarize,
)
from rrcm.errors import UserError
from test_train import HostReads

AUGMENTATIONS = {
    "crop": lambda x, g: random_resized_crop(x, x.shape[-1], generator=g),
    "flip": lambda x, g: random_flip(x, generator=g),
    "jitter": lambda x, g: color_jitter(x, generator=g),
    "grayscale": lambda x, g: random_grayscale(x, p=0.5, generator=g),
    "blur": lambda x, g: gaussian_blur(x, p=0.5, generator=g),
    "solarize": lambda x, g: solarize(x, p=0.5, generator=g),
    "finetune": lambda x, g: finetune_view(x, generator=g),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 16, c: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=gen(seed))


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_range_determinism(name, channels):
    fn = AUGMENTATIONS[name]
    x = images(c=channels)
    y = fn(x, gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0 <= y.min() and y.max() <= 1
    assert torch.equal(y, fn(x, gen(1)))
    if name != "grayscale" or channels == 3:
        assert not torch.equal(y, x), "a random augmentation left every image unchanged"
        assert not torch.equal(y, fn(x, gen(2))), "the generator's seed does not matter"


def test_crop_geometry():
    x = images()
    # The whole square image, resized to its own size: the identity.
    assert torch.allclose(random_resized_crop(x, 20, scale=(1, 1), ratio=(1, 1), generator=gen()), x, atol=1e-6)
    # A horizontal ramp cropped to a quarter of the area (half the width) spans about half the range.
    ramp = torch.linspace(0, 1, 32).expand(64, 1, 32, 32)
    y = random_resized_crop(ramp, 32, scale=(0.25, 0.25), ratio=(1, 1), generator=gen())
    spread = y.amax((1, 2, 3)) - y.amin((1, 2, 3))
    assert ((spread > 0.45) & (spread <= 0.5 + 1e-6)).all()
    assert y.amin((1, 2, 3)).unique().numel() > 32  # boxes in different places
    # Output size differs from the input's.
    assert random_resized_crop(x, 9, generator=gen()).shape == (16, 3, 9, 9)
    # Ratios an image cannot hold fall back to a centred box.
    wide = torch.zeros(4, 1, 4, 40)
    wide[..., 16:24] = 1
    y = random_resized_crop(wide, 8, scale=(0.99, 1), ratio=(1, 1), generator=gen())
    assert y.shape == (4, 1, 8, 8) and torch.equal(y, torch.ones_like(y))


def test_flip():
    x = images(b=64)
    assert torch.equal(random_flip(x, p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, p=0.0), x)
    y = random_flip(x, generator=gen())
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert (flipped | (y == x).flatten(1).all(1)).all() and 10 < flipped.sum() < 54


def test_color_jitter():
    x = images(b=64)
    assert torch.equal(color_jitter(x, p=0.0, generator=gen()), x)
    y = color_jitter(x, p=0.5, generator=gen())
    changed = (y != x).flatten(1).any(1)
    assert 16 < changed.sum() < 48
    # Brightness alone scales each image by one factor in [0.6, 1.4] (before clipping at 1).
    y = color_jitter(x * 0.5, 0.4, 0, 0, 0, p=1.0, generator=gen())
    factor = y / (x * 0.5)
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-4)
    assert ((factor[:, 0, 0, 0] >= 0.6) & (factor[:, 0, 0, 0] <= 1.4)).all() and factor.std() > 0.1
    # Saturation 0..2 never moves the luma; one-channel images get brightness and contrast only.
    muted = 0.4 + 0.2 * x  # saturation x2 stays inside [0, 1]
    y = color_jitter(muted, 0, 0, 1.0, 0, p=1.0, generator=gen())
    assert torch.allclose(grayscale(y), grayscale(muted), atol=1e-5) and not torch.allclose(y, muted, atol=0.01)
    gray = images(c=1)
    assert torch.equal(color_jitter(gray, 0, 0, 0.9, 0.5, p=1.0, generator=gen()), gray)


def test_hue_matches_colorsys():
    x = images(b=4, size=6)
    shift = torch.tensor([0.1, -0.3, 0.5, 1 / 3])
    y = _hue(x, shift)
    for i in range(4):
        for r, c in [(0, 0), (2, 5), (5, 1)]:
            h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
            expected = colorsys.hsv_to_rgb((h + shift[i].item()) % 1, s, v)
            assert torch.allclose(y[i, :, r, c], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(y[3], x[3, [2, 0, 1]], atol=1e-5)  # a third of a turn: R -> G -> B -> R


def test_grayscale():
    x = images(b=64)
    y = random_grayscale(x, p=1.0)
    assert torch.allclose(y, grayscale(x).expand_as(x)) and torch.equal(y[:, 0], y[:, 2])
    assert torch.equal(random_grayscale(x, p=0.0), x)
    gray = images(c=1)
    assert torch.equal(random_grayscale(gray, p=1.0), gray)


def test_gaussian_blur():
    impulse = torch.zeros(32, 1, 15, 15)
    impulse[:, :, 7, 7] = 1
    y = gaussian_blur(impulse, p=1.0, sigma=(0.5, 2.0), generator=gen())
    assert torch.allclose(y.sum((1, 2, 3)), torch.ones(32), atol=1e-5)  # mass kept
    assert torch.allclose(y, y.flip(-1), atol=1e-6) and torch.allclose(y, y.transpose(-1, -2), atol=1e-6)
    peaks = y[:, 0, 7, 7]
    assert peaks.max() < 0.65 and peaks.unique().numel() == 32  # each image its own sigma
    # Sigma 1 peak: (sum_k exp(-k^2 / 2))^-2 over k = -3..3.
    y = gaussian_blur(impulse[:1], p=1.0, sigma=(1, 1))
    norm = sum(torch.exp(torch.tensor(-k * k / 2)) for k in range(-3, 4))
    assert torch.allclose(y[0, 0, 7, 7], norm ** -2, atol=1e-6)
    x = images(c=3, b=64)
    y = gaussian_blur(x, p=0.5, generator=gen())
    changed = (y != x).flatten(1).any(1)
    assert 16 < changed.sum() < 48 and y[changed].std() < x[changed].std()


def test_solarize():
    x = images(b=32)
    y = solarize(x, p=1.0)
    assert torch.equal(y, torch.where(x >= 0.5, 1 - x, x)) and y.max() <= 0.5
    assert torch.equal(solarize(x, p=0.0), x)


def test_resize_center_crop():
    x = images(size=20)
    assert resize_center_crop(x, 20) is x
    stripe = torch.zeros(2, 1, 40, 80)
    stripe[..., 16:64] = 1  # the centre of a wide image
    y = resize_center_crop(stripe, 20)
    assert y.shape == (2, 1, 20, 20) and torch.allclose(y, torch.ones_like(y))


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_pretrain_views(channels, size):
    x = images(b=32, c=channels, size=size)
    views = PretrainViews(size)
    simple, a, b = views(x, gen(3))
    for v in (simple, a, b):
        assert v.shape == x.shape and 0 <= v.min() and v.max() <= 1
    # The simple view only flips; the strong views crop, so they differ from it and from each other.
    assert ((simple == x) | (simple == x.flip(-1))).flatten(1).all(1).all()
    assert (a - b).abs().mean() > 0.05 and (a - simple).abs().mean() > 0.05
    again = views(x, gen(3))
    assert all(torch.equal(u, v) for u, v in zip((simple, a, b), again))
    assert not torch.equal(a, views(x, gen(4))[1])


def test_pretrain_views_resize_and_asymmetry():
    x = images(b=64, size=40)
    simple, a, b = PretrainViews(24, blur_p_a=1.0, blur_p_b=0.0, solarize_p_b=1.0, jitter_p=0.0,
                                 grayscale_p=0.0, blur_sigma=(0.1, 2.0))(x, gen())
    assert simple.shape == a.shape == b.shape == (64, 3, 24, 24)
    assert b.max() <= 0.5 + 1e-6  # always solarized
    assert a.std((1, 2, 3)).mean() < b.std((1, 2, 3)).mean()  # always blurred, b never is


def test_blur_scales_with_image_size():
    assert PretrainViews(224).blur_sigma == (0.1, 2.0) and PretrainViews(512).blur_sigma == (0.1, 2.0)
    assert PretrainViews(28).blur_sigma == pytest.approx((0.0125, 0.25))
    assert PretrainViews(28, blur_sigma=(1.0, 1.5)).blur_sigma == (1.0, 1.5)


def test_bad_input():
    with pytest.raises(UserError, match="float images"):
        random_flip(torch.zeros(3, 8, 8))
    with pytest.raises(UserError, match="float images"):
        color_jitter(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(UserError, match="crop scale"):
        random_resized_crop(images(), 8, scale=(0.5, 0.2))
    with pytest.raises(UserError, match="blur_p_b must be a probability"):
        PretrainViews(32, blur_p_b=1.5)
    with pytest.raises(UserError, match="image size"):
        PretrainViews(0)


@pytest.mark.cuda
@pytest.mark.parametrize("channels", [1, 3])
def test_views_read_nothing_back_from_the_device(channels):
    x = images(b=32, c=channels, size=28)
    views = PretrainViews(28, blur_sigma=(0.5, 2.0))
    reads = HostReads([x])
    with reads:
        out = (*views(x, gen(3)), finetune_view(x, gen(4)))
    assert reads.reads == [] and all(reads.tagged(v) for v in out)
    with reads:  # the check can fail: the old per-image selection read the mask's size back
        x[torch.rand(32, generator=gen(5)) < 0.5].clamp_(0, 1)
    assert [what for _, what in reads.reads] == ["aten.index.Tensor"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_with_cpu_generator_match_cpu():
    x = images(b=32, c=3, size=32)
    views = PretrainViews(32)
    on_cpu = views(x, gen(5))
    on_gpu = views(x.cuda(), gen(5))
    for u, v in zip(on_cpu, on_gpu):
        assert v.is_cuda and torch.allclose(u, v.cpu(), atol=1e-4)
