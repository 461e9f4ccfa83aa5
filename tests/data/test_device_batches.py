"""data/device_batches.py: the training set kept on the device, augmented per sample there."""

from __future__ import annotations

import torch

from histo_wsl.data.device_batches import DeviceBatches
from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD, LabelledImages, train_transform
from histo_wsl.data.sources import load_samples
from histo_wsl.synthetic.patches import write_patch_dataset


def _images(tmp_path, size=32):
    csv_path = write_patch_dataset(tmp_path / "d", n_per_class=3, size=48, seed=1)
    ds = load_samples(csv_path)
    return LabelledImages(ds.samples, size, train_transform(size, jitter=False))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255.0


def test_batches_are_crops_of_their_images_flipped_or_not(tmp_path):
    data = _images(tmp_path)
    source = torch.stack([c[0] for c in data.cached()])
    masks = torch.stack([c[1] for c in data.cached()])
    batches = DeviceBatches(data, torch.device("cpu"), crop=24, jitter=False)
    torch.manual_seed(0)
    seen_flips = set()
    for _ in range(8):
        b = batches.batch([0, 3, 5])
        assert b["image"].shape == (3, 3, 24, 24) and b["image"].dtype == torch.float32
        assert b["mask"].shape == (3, 24, 24) and b["label"].tolist() == [
            data.samples[i].label for i in (0, 3, 5)
        ]
        pixels = _unnormalise(b["image"]).round().to(torch.uint8)
        for j, i in enumerate((0, 3, 5)):
            found = None
            for fv in (False, True):
                for fh in (False, True):
                    img = source[i].flip(-1) if fh else source[i]
                    img = img.flip(-2) if fv else img
                    win = img.unfold(1, 24, 1).unfold(2, 24, 1)  # 3,oy,ox,24,24
                    hit = (win == pixels[j][:, None, None]).flatten(3).all(-1).all(0)
                    if hit.any():
                        found = (fv, fh)
            assert found is not None, "a batch image is no flipped crop of its source"
            seen_flips.add(found)
        # the mask follows the image's crop and flips
        assert set(b["mask"].unique().tolist()) <= set(masks.unique().tolist())
    assert len(seen_flips) >= 3  # flips are drawn per sample


def test_full_batches_over_the_indices_and_jitter_changes_colour_only(tmp_path):
    data = _images(tmp_path)
    plain = DeviceBatches(data, torch.device("cpu"), crop=32, jitter=False)
    jittered = DeviceBatches(data, torch.device("cpu"), crop=32, jitter=True)
    assert len(list(plain.batches(range(6), 4))) == 1  # the partial batch is dropped
    torch.manual_seed(3)
    a = plain.batch([1, 2])
    torch.manual_seed(3)
    b = jittered.batch([1, 2])
    assert torch.equal(a["mask"], b["mask"]) and not torch.allclose(a["image"], b["image"])
