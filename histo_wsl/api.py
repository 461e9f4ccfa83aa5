"""The Python interface, for notebooks and scripts: ``from histo_wsl import localize, evaluate, load_model``.

The same functions the command line calls, taking what a notebook has at hand: model names as well
as paths (``"glas-negev-mobilenetv2"``, a model folder, a ``.pt`` file; None: the default model),
slides as paths, folders, glob patterns or CSV lists, and settings as keyword arguments named like
the options (``mpp=``, ``overlap=``, ``batch_size=``...). Each writes the same files as its command
and returns a result object::

    from histo_wsl import evaluate, load_model, localize

    run = localize("slides/*.svs", "maps")             # the default model
    run.records["slide-1"]["roi_area_um2"]              # each slide's <slide>.json, as a dict
    model = load_model("glas-negev-mobilenetv2")
    logits, maps = model.predict(batch)                 # (B, 3, S, S) normalised images
    result = evaluate("maps", annotations="qupath/", out="slide-eval")
    result["models"][0]["pxap"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histo_wsl.errors import InputError

if TYPE_CHECKING:
    from histo_wsl.inference.predictor import Predictor
    from histo_wsl.runtime.batch import BatchOptions, RunSummary

__all__ = ["evaluate", "load_model", "localize", "model_checkpoint"]


def model_checkpoint(model: str | Path | None) -> tuple[Path, str | None]:
    """The checkpoint a model reference means, and the default model's name when none was given.

    Raises:
        InputError: an unknown name or path, or no model given and no default installed.
    """
    from histo_wsl.inference.params import MISSING_MODEL
    from histo_wsl.registry.registry import default_model, resolve_model

    if model is not None:
        return resolve_model(model), None
    entry = default_model()
    if entry is None:
        raise InputError(MISSING_MODEL)
    return entry.weights, entry.name


def load_model(
    model: str | Path | None = None,
    *,
    device: str = "cpu",
    tta: str | None = None,
    cam: str | None = None,
) -> Predictor:
    """A trained model ready to predict (``weights_only`` loading: a model file runs no code).

    Args:
        model: an installed model's name, a model folder or a checkpoint; None: the default model.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        tta: test-time augmentation overriding the card's (``none``, ``flips``).
        cam: CAM method overriding a stage-1 card's (``gradcampp``...).

    Returns:
        A :class:`~histo_wsl.inference.predictor.Predictor`: ``predict(x)`` gives class logits and
        maps in [0, 1]; ``card`` is its model card.
    """
    from histo_wsl.inference.predictor import load_model as load
    from histo_wsl.training.engine import resolve_device

    path, _ = model_checkpoint(model)
    predictor = load(path, map_location="cpu", cam_method=cam, tta=tta)
    predictor.to(resolve_device(device))
    return predictor


def localize(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    model: str | Path | None = None,
    options: BatchOptions | None = None,
    **params: Any,
) -> RunSummary:
    """Map the model's ROI class on slides and images (``histo-wsl localize``).

    Args:
        inputs: a slide or image, a folder, a glob pattern, a CSV list, or a list of those.
        out: the output folder (``<out>/<slide>/``: probability TIFFs, mask, GeoJSON, overlay,
            ``<slide>.json``).
        model: an installed model's name, a model folder or a checkpoint; None: the default model.
        options: overwrite, skip errors, shard, progress bar (default: quiet, stop on an error).
        **params: the settings of :class:`~histo_wsl.inference.params.LocalizeParams`, named like
            the command's options (``mpp``, ``overlap``, ``batch_size``, ``device``...).

    Returns:
        The run's summary: ``exit_code``, ``items`` and ``records`` (each slide's record by name).

    Raises:
        InputError: a bad input, setting or model (before any slide is processed).
    """
    from histo_wsl.inference.localize import localize as run
    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.runtime.batch import BatchOptions
    from histo_wsl.runtime.inputs import collect_inputs, select_shard

    path, _ = model_checkpoint(model)
    try:
        settings = LocalizeParams(model=path, **params)
    except TypeError as exc:
        raise InputError(f"localize: {exc} (the settings are LocalizeParams' fields)") from None
    settings.validate()
    options = options or BatchOptions(quiet=True)
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    items = select_shard(collect_inputs(specs), options.shard)
    return run(items, Path(out), settings, options)


def evaluate(
    models: str | Path | Sequence[str | Path] | None = None,
    data: str | Path | None = None,
    *,
    out: str | Path = "evaluation",
    annotations: str | Path | None = None,
    quiet: bool = True,
    **settings: Any,
) -> dict:
    """Score models, or localize's slide maps, against ground truth (``histo-wsl evaluate``).

    Two forms, as the command's: ``evaluate(model, data, out=...)`` evaluates one model (or a
    list, side by side) on images with masks; ``evaluate(maps_folder, annotations=..., out=...)``
    scores the maps ``localize`` wrote against QuPath GeoJSON, ASAP XML or mask annotations.

    Args:
        models: model names, folders or checkpoints; with ``annotations``, localize's out folder.
        data: the images and masks (any dataset layout ``evaluate`` reads).
        out: the output folder (metrics.json, per_image.csv, report.md/.html, run.json).
        annotations: the annotation folder or file (slides).
        quiet: no progress bar.
        **settings: :class:`~histo_wsl.evaluation.data.EvalSettings` or
            :class:`~histo_wsl.evaluation.slides.SlideEvalSettings` fields (``split``, ``fold``,
            ``bootstrap``, ``roi_classes``...).

    Returns:
        The summary the command prints with ``--json``: output files, data, per model the
        headline numbers; every number is in ``<out>/metrics.json``.
    """
    out = Path(out)
    if annotations is not None:
        from histo_wsl.evaluation.slides import SlideEvalSettings, run_evaluate_slides

        if models is None or not isinstance(models, (str, Path)):
            raise InputError("give localize's output folder (one) with annotations=")
        try:
            slides = SlideEvalSettings(Path(models), Path(annotations), out, **settings)
        except TypeError as exc:
            raise InputError(f"evaluate: {exc} (see SlideEvalSettings' fields)") from None
        return run_evaluate_slides(slides, argv=[], quiet=quiet)

    from histo_wsl.evaluation.data import EvalSettings
    from histo_wsl.evaluation.images import run_evaluate

    if models is None or data is None:
        raise InputError("give the model(s) and data=, or a maps folder and annotations=")
    refs = [models] if isinstance(models, (str, Path)) else list(models)
    paths = [model_checkpoint(m)[0] for m in refs]
    try:
        images = EvalSettings(models=paths, data=str(data), out=out, **settings)
    except TypeError as exc:
        raise InputError(f"evaluate: {exc} (see EvalSettings' fields)") from None
    return run_evaluate(images, argv=[], quiet=quiet)
