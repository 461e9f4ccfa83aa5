"""Making and reading training data: dataset layouts, images and masks, patch extraction.

* :mod:`~histo_wsl.data.bags` — Slides of a patch folder as multiple-instance bags: one label per
  slide, its patches the instances.
* :mod:`~histo_wsl.data.device_batches` — The training set decoded once and kept on the training
  device, batches augmented there.
* :mod:`~histo_wsl.data.extract` — ``extract-patches``: tile slides into a patch folder that
  training reads directly.
* :mod:`~histo_wsl.data.images` — Torch datasets over :class:`~histo_wsl.data.sources.Sample` lists,
  with the papers' transforms.
* :mod:`~histo_wsl.data.sources` — Where labelled images come from: the dataset layouts histo-wsl
  reads, as one list of samples.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "Bag": "bags",
    "BagSet": "bags",
    "load_bags": "bags",
    "NEGATIVE_NAMES": "bags",
    "split_bags": "bags",
    "DeviceBatches": "device_batches",
    "ASSUMED_MPP": "extract",
    "extract_patches": "extract",
    "extract_slide": "extract",
    "ExtractParams": "extract",
    "write_manifest": "extract",
    "check_samples": "images",
    "eval_transform": "images",
    "IMAGENET_MEAN": "images",
    "IMAGENET_STD": "images",
    "jitter_transform": "images",
    "LabelledImages": "images",
    "train_transform": "images",
    "Dataset": "sources",
    "IMAGE_SUFFIXES": "sources",
    "load_samples": "sources",
    "Sample": "sources",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
