"""Batched augmentations against torchvision's single-image functions, and the in-memory image cache."""

import os

import pytest
import torch
import torchvision.transforms.functional as TF

from smallssl.data import CorruptImageError
from smallssl.data import batch_aug as A
from smallssl.data.memdata import load_images
from tests.conftest import make_image_folder


def _imgs(n=4, h=9, w=11, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, tv, factors", [
    ("adjust_brightness", TF.adjust_brightness, [0.6, 1.0, 1.3, 1.4]),
    ("adjust_contrast", TF.adjust_contrast, [0.6, 1.0, 1.3, 0.0]),
    ("adjust_saturation", TF.adjust_saturation, [0.6, 1.0, 1.3, 0.0]),
    ("adjust_hue", TF.adjust_hue, [-0.1, 0.0, 0.05, 0.5]),
])
def test_colour_ops_match_torchvision(name, tv, factors):
    x = _imgs()
    out = getattr(A, name)(x.clone(), torch.tensor(factors))
    ref = torch.stack([tv(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_hsv_round_trip_and_greyscale_matches_torchvision():
    x = _imgs(seed=1)
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.grayscale(x), torch.stack([TF.rgb_to_grayscale(i) for i in x]), atol=1e-6, rtol=0)


def test_full_box_crop_is_identity_and_flip_mirrors():
    x = _imgs(h=8, w=8)
    mean, std = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    plain = dict(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grey_p=0.0)
    out = A.BatchAugment(flip_p=0.0, **plain)(x)
    torch.testing.assert_close(out * std + mean, x, atol=1e-5, rtol=0)
    out = A.BatchAugment(flip_p=1.0, **plain)(x)
    torch.testing.assert_close(out * std + mean, x.flip(-1), atol=1e-5, rtol=0)


def test_crop_area_and_aspect():
    # Pixel value = its column in [0, 1): a crop of width fraction w spans about w of the values.
    n, s = 64, 32
    cols = (torch.arange(s).float() + 0.5) / s
    x = cols.view(1, 1, 1, s).expand(n, 3, s, s).contiguous()
    aug = A.BatchAugment(size=s, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grey_p=0.0,
                         mean=(0, 0, 0), std=(1, 1, 1))
    out = aug(x, torch.Generator().manual_seed(0))
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # last minus first column of the crop
    torch.testing.assert_close(span, torch.full((n,), 0.5 * (s - 1) / s), atol=1e-4, rtol=0)
    assert out.min() >= 0 and out.max() <= 1
    # Two different crops of the batch really differ in position.
    assert out[:, 0, 0, 0].std() > 0.05


def test_seeded_and_per_sample():
    x = (torch.rand(16, 3, 12, 12) * 255).to(torch.uint8)
    aug = A.BatchAugment(size=12, solarize_p=0.5)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = x[:1].expand(16, -1, -1, -1)
    d = aug(same, torch.Generator().manual_seed(0))
    assert (d - d[:1]).abs().flatten(1).amax(1).gt(1e-3).sum() >= 14  # each copy augmented differently


def test_grey_and_solarize_always():
    x = _imgs(h=6, w=6, seed=2)
    out = A.BatchAugment(size=6, scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, grey_p=1.0, solarize_p=1.0,
                         mean=(0, 0, 0), std=(1, 1, 1))(x)
    g = A.grayscale(x).expand_as(x)
    torch.testing.assert_close(out, torch.where(g >= 0.5, 1 - g, g), atol=1e-5, rtol=0)


def test_load_images_cache_and_labels(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=4, size=20)
    cache = str(tmp_path / "cache")
    x, y, classes = load_images(os.path.join(root, "train"), 16, cache_dir=cache, workers=0, verbose=False)
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and classes == ["c0", "c1", "c2"]
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".pt")
    # the cached copy is what a second call returns (overwrite it with a marker to prove it is read)
    torch.save({"images": torch.zeros_like(x), "labels": y}, os.path.join(cache, files[0]))
    x2, _, _ = load_images(os.path.join(root, "train"), 16, cache_dir=cache, workers=0, verbose=False)
    assert x2.sum() == 0
    # a different size is a different cache entry
    x3, _, _ = load_images(os.path.join(root, "train"), 8, cache_dir=cache, workers=0, verbose=False)
    assert x3.shape[-1] == 8 and len(os.listdir(cache)) == 2


def test_load_images_corrupt_names_file(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2, size=8)
    bad = os.path.join(root, "train", "c1", "bad.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_images(os.path.join(root, "train"), 8, workers=0, verbose=False)


def test_blur_matches_torchvision():
    x = _imgs(n=3, h=10, w=12, seed=5)
    sig = [0.3, 1.0, 2.0]
    out = A.gaussian_blur(x, torch.tensor(sig), 5)
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [s, s]) for i, s in enumerate(sig)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_normalized_images_equal_the_pil_eval_transform(tmp_path):
    from smallssl.data import SafeImageFolder, eval_transform
    from smallssl.data.memdata import NormalizedImages

    root = os.path.join(make_image_folder(tmp_path / "d", classes=2, per_class=3, size=16), "train")
    x, y, _ = load_images(root, 16, workers=0, verbose=False)
    mem, pil = NormalizedImages(x, y), SafeImageFolder(root, eval_transform(16))
    for i in range(len(pil)):
        torch.testing.assert_close(mem[i][0], pil[i][0], atol=1e-6, rtol=0)
        assert mem[i][1] == pil[i][1]
