"""Training configurations: defaults, a YAML file, then explicit flags, in that order.

The settings live in sections (run, data, model, optim, knn, negev, maxmin: ``cfg.optim.lr``),
while options and YAML keys stay flat (``--lr``, ``lr: 0.1``); :data:`FLAT` maps one to the other.
A YAML file may be flat or in sections; a key that is not an option is rejected (never silently
ignored). The resolved configuration is written in sections as ``config.yaml`` beside the
checkpoints so that a run can be repeated exactly; a flat ``config.yaml`` of an older run still
resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from histo_wsl.errors import InputError
from histo_wsl.runtime.atomic import write_text

__all__ = [
    "FLAT",
    "SECTIONS",
    "DataSettings",
    "KNNSettings",
    "MaxMinSettings",
    "ModelSettings",
    "NEGEVSettings",
    "OptimSettings",
    "RunSettings",
    "TrainConfig",
    "flatten",
    "load_config",
    "merge_config",
    "save_config",
]


@dataclass
class RunSettings:
    """Where and how a run executes: output, device, workers, seed, schedule of saves."""

    out: str = "runs/train"
    device: str = "auto"
    workers: int = 2
    amp: bool = True
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    eval_every: int = 1  # validation, selection and last.pt every N epochs and at the last
    data_on_device: bool = False  # training set kept and augmented on the device
    channels_last: bool = False
    time_limit: float | None = None  # minutes; stop (resumable) after the epoch that passes it
    skip_errors: bool = False


@dataclass
class DataSettings:
    """The training data and how images are fed (sizes in pixels, mpp in µm/px)."""

    path: str = ""  # flag --data
    classes: list[str] | None = None
    negative_class: str | None = None
    fold: int = 0
    val_fraction: float = 0.2
    data_mpp: float | None = None
    crop_size: int = 224
    resize_size: int = 256
    color_jitter: bool = True
    #: ``squash``: images resized to a resize_size square (the papers); ``isotropic``: resized by
    #: one factor, aspect kept, to the µm/px the card records (what localize reads slides at)
    geometry: str = "squash"
    #: images placed on glass in training (:class:`histo_wsl.data.images.GlassMargins`); the
    #: decoder learns the glass as background
    glass: bool = False


@dataclass
class ModelSettings:
    """The network: method, backbone, pooling head, ImageNet weights, CAM method."""

    method: str = "cam"
    backbone: str = "mobilenetv2"
    head: str = "wgap"
    pretrained: bool = True
    cam_method: str = "cam"


@dataclass
class OptimSettings:
    """SGD and its step schedule (learning rates per step, ``step_size`` in epochs)."""

    epochs: int = 20
    batch_size: int = 16  # 32 peaks at 7.4 GB on CPU (MobileNetV2, 224 px): train_memory.py
    lr: float = 0.003
    lr_classifier_ratio: float = 10.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    step_size: int = 250
    gamma: float = 0.1
    clip_grad_norm: float | None = None  # cap on the gradients' global L2 norm (None: no cap)


@dataclass
class KNNSettings:
    """The k-NN map both NEGEV (seeds) and Max-Min use, and the refinement of the final map."""

    knn_k: int = 128
    knn_bank: int = 16384
    knn_dims: int = 64
    knn_stages: int = 2  # the encoder's last stages in the keys
    refine: str = "none"  # or knn: the map blended with its k-NN map (networks/knn.py)
    refine_alpha: float = 1.0  # weight of the k-NN map in the blend


@dataclass
class NEGEVSettings:
    """Stage 2 (``train-decoder``): the frozen classifier and the pixel-evidence terms."""

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
    seed_map: str = "cam"  # cam, or knn: the CAM averaged over look-alike pixels (methods/knn.py)
    size_lambda: float = 0.0  # NEGEV's optional size term (0 = off, the paper)
    size_t0: float = 1.0
    size_t_max: float = 10.0
    size_t_mult: float = 1.01
    crf_lambda: float = 0.0  # colour-affinity (CRF) term on the decoder's softmax (0 = off)
    crf_sigma_rgb: float = 15.0
    crf_sigma_xy: float = 8.0
    crf_scale: float = 0.25
    # with a negative class: seeds from the true class's CAM minus the negative class's CAM
    seed_contrast: bool = True


@dataclass
class MaxMinSettings:
    """Max-Min uncertainty (TMI 2022, ``train-classifier --method maxmin``); λ chosen in docs/maxmin.md."""

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


#: the sections of a :class:`TrainConfig`, in the order config.yaml lists them
SECTIONS: dict[str, type] = {
    "run": RunSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "optim": OptimSettings,
    "knn": KNNSettings,
    "negev": NEGEVSettings,
    "maxmin": MaxMinSettings,
}

#: Every flat key (an option's name, a key of a flat YAML file or an old config.yaml) and the
#: section field it sets, in the order of the flat form (the ``config`` of model cards).
FLAT: dict[str, tuple[str, str]] = {
    "data": ("data", "path"),
    "out": ("run", "out"),
    **{k: ("model", k) for k in ("method", "backbone", "head", "pretrained")},
    **{k: ("data", k) for k in ("classes", "negative_class", "fold", "val_fraction", "data_mpp")},
    **{
        k: ("optim", k)
        for k in (
            "epochs batch_size lr lr_classifier_ratio momentum nesterov weight_decay step_size "
            "gamma"
        ).split()
    },
    **{k: ("data", k) for k in ("crop_size", "resize_size", "color_jitter", "geometry", "glass")},
    "cam_method": ("model", "cam_method"),
    **{k: ("run", k) for k in "workers device amp seed deterministic max_steps_per_epoch".split()},
    "clip_grad_norm": ("optim", "clip_grad_norm"),
    **{
        k: ("run", k)
        for k in "eval_every data_on_device channels_last time_limit skip_errors".split()
    },
    **{f.name: ("negev", f.name) for f in dataclasses.fields(NEGEVSettings)[:13]},
    **{f.name: ("knn", f.name) for f in dataclasses.fields(KNNSettings)},
    **{f.name: ("negev", f.name) for f in dataclasses.fields(NEGEVSettings)[13:]},
    **{f.name: ("maxmin", f.name) for f in dataclasses.fields(MaxMinSettings)},
    "extra": ("", "extra"),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on (stage 1, stage 2 and Max-Min share it), by section.

    ``cfg.optim.lr``, ``cfg.negev.seeds_fg``...: :data:`FLAT` maps each option (``--lr``, YAML key
    ``lr``) to its section field; the only renamed field is ``--data``, ``cfg.data.path``.
    """

    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    knn: KNNSettings = field(default_factory=KNNSettings)
    negev: NEGEVSettings = field(default_factory=NEGEVSettings)
    maxmin: MaxMinSettings = field(default_factory=MaxMinSettings)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, **more: Any) -> TrainConfig:
        """The defaults overridden by flat keys (option names), e.g. ``from_flat(lr=0.1)``.

        Raises:
            InputError: a key that is not an option.
        """
        values = {**(values or {}), **more}
        unknown = sorted(k for k in values if k not in FLAT)
        if unknown:
            raise InputError(f"unknown config key(s) {unknown}")
        cfg = cls()
        for key, value in values.items():
            section, name = FLAT[key]
            setattr(getattr(cfg, section) if section else cfg, name, value)
        return cfg

    def to_flat(self) -> dict[str, Any]:
        """One key per option, in :data:`FLAT`'s order (a model card's ``config``)."""
        return {
            key: getattr(getattr(self, section) if section else self, name)
            for key, (section, name) in FLAT.items()
        }


def flatten(data: dict, path: Path | None = None) -> dict:
    """Flat keys from a config mapping written flat (keys = option names) or in sections.

    Raises:
        InputError: a section key that is not a field of its section.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            by_field = {name: k for k, (sec, name) in FLAT.items() if sec == key}
            for sub, v in value.items():
                sub = sub.replace("-", "_")
                if sub not in by_field:
                    raise InputError(
                        f"unknown key {key}.{sub}; valid keys of {key}: {', '.join(by_field)}",
                        path,
                    )
                flat[by_field[sub]] = v
        else:
            flat[key] = value
    return flat


def load_config(path: str | Path) -> dict:
    """Read a YAML config file (flat or in sections) as flat keys, checked against the options.

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
    flat = flatten(data, path)
    unknown = sorted(k for k in flat if k not in FLAT)
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}; valid keys: {', '.join(FLAT)}", path)
    return flat


def merge_config(*layers: dict[str, Any]) -> TrainConfig:
    """The defaults overridden by each layer of flat keys in turn (later layers win)."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    return TrainConfig.from_flat(values)


def save_config(path: str | Path, cfg: TrainConfig) -> None:
    """Write the resolved config as YAML in sections (atomically); :func:`load_config` reads it."""
    write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
