"""Training configurations: defaults, a YAML file, then explicit flags, in that order.

A YAML key that is not a field is rejected (never silently ignored); the resolved configuration is
written as ``config.yaml`` beside the checkpoints so that a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from histo_wsl.errors import InputError
from histo_wsl.runtime.atomic import write_text

__all__ = ["TrainConfig", "load_config", "merge_config", "save_config"]

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Everything a training run depends on (stage 1, stage 2 and Max-Min share it).

    Units: learning rates per step, ``step_size`` in epochs, image sizes in pixels, mpp in µm/px.
    """

    data: str = ""
    out: str = "runs/train"
    method: str = "cam"
    backbone: str = "mobilenetv2"
    head: str = "wgap"
    pretrained: bool = True
    classes: list[str] | None = None
    negative_class: str | None = None
    fold: int = 0
    val_fraction: float = 0.2
    data_mpp: float | None = None
    epochs: int = 20
    batch_size: int = 16  # 32 peaks at 7.4 GB on CPU (MobileNetV2, 224 px): train_memory.py
    lr: float = 0.003
    lr_classifier_ratio: float = 10.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    step_size: int = 250
    gamma: float = 0.1
    crop_size: int = 224
    resize_size: int = 256
    color_jitter: bool = True
    cam_method: str = "cam"
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    clip_grad_norm: float | None = None  # cap on the gradients' global L2 norm (None: no cap)
    eval_every: int = 1  # validation, selection and last.pt every N epochs and at the last
    data_on_device: bool = False  # training set kept and augmented on the device
    channels_last: bool = False
    time_limit: float | None = None  # minutes; stop (resumable) after the epoch that passes it
    skip_errors: bool = False
    # stage 2 (NEGEV): the frozen stage-1 checkpoint and the pixel-evidence settings
    classifier: str | None = None
    seeds_fg: int = 1
    seeds_bg: int = 1
    seed_ksize: int = 3
    seed_lambda: float = 1.0
    bg_sampler: str = "proportional"
    low_fraction: float = 0.2
    fg_sampler: str = "proportional"  # or otsu (the original code's threshold seeder)
    fg_erode: int = 11
    negative_lambda: float = 1.0
    seed_mode: str = "random"  # random (drawn every step) or static (top/bottom CAM pixels)
    seed_teacher: str | None = None  # a NEGEV checkpoint whose map replaces the CAM for seeds
    seed_map: str = "cam"  # cam, or knn: the CAM averaged over look-alike pixels (seed_bank.py)
    knn_k: int = 128
    knn_bank: int = 16384
    knn_dims: int = 64
    refine: str = "none"  # or knn: the map blended with its k-NN map (networks/knn_refiner.py)
    refine_alpha: float = 1.0  # weight of the k-NN map in the blend
    size_lambda: float = 0.0  # NEGEV's optional size term (0 = off, the paper)
    size_t0: float = 1.0
    size_t_max: float = 10.0
    size_t_mult: float = 1.01
    crf_lambda: float = 0.0  # colour-affinity (CRF) term on the decoder's softmax (0 = off)
    crf_sigma_rgb: float = 15.0
    crf_sigma_xy: float = 8.0
    crf_scale: float = 0.25
    # Max-Min (TMI 2022, method.md §2): train-classifier --method maxmin
    # GlaS fold-0 val PxAP after 3 epochs: 1e-7 66.9, 0.1 75.4, 1 55.6; 50-epoch CPU recipe with
    # --refine knn (best-loc, native protocol): 0.1 78.5, 0.3 81.9 (docs/results.md, Max-Min)
    maxmin_lambda: float = 0.3
    maxmin_regularizer: str = "sem"
    maxmin_w: float = 5.0
    maxmin_sigma: float = 0.15
    maxmin_sigma_step: float = 0.001
    maxmin_sigma_max: float = 0.2
    maxmin_cl_scale: float = 0.8  # the paper's code (scale_in_cl): C sees X± at 0.8× size
    maxmin_size: bool = True
    elb_t0: float = 5.0
    elb_t_max: float = 10.0
    elb_mult: float = 1.01
    extra: dict = field(default_factory=dict)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def load_config(path: str | Path, cls: type[C] = TrainConfig) -> dict:
    """Read a YAML config file and check its keys against ``cls``'s fields.

    Raises:
        InputError: unreadable YAML, not a mapping, or an unknown key (named, with the valid ones).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"cannot read the config ({exc.strerror})", path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{where}not valid YAML ({getattr(exc, 'problem', exc)})", path) from None
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of key: value", path)
    names = _field_names(cls)
    unknown = sorted(k for k in data if k.replace("-", "_") not in names)
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}; valid keys: {', '.join(names)}", path)
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge_config(cls: type[C], *layers: dict[str, Any]) -> C:
    """Build ``cls`` from its defaults overridden by each layer in turn (later layers win)."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items()})
    unknown = [k for k in values if k not in _field_names(cls)]
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}")
    return cls(**values)


def save_config(path: str | Path, cfg: Any) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
