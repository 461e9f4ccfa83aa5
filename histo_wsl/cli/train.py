"""``histo-wsl train-classifier`` (stage 1: CAM or Max-Min), ``train-decoder``, ``train-mil``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import print_json, reports_errors
from histo_wsl.cli.options import JsonOpt, QuietOpt

EPILOG = (
    "Examples: histo-wsl train-classifier ../shared/data/glas --fold 0 --out runs/cam "
    "--epochs 40 --batch-size 16 --lr 0.003  |  histo-wsl train-classifier patches/ "
    "--negative-class normal --out runs/cam  |  histo-wsl train-classifier --config cam.yaml "
    "data.csv  |  histo-wsl train-classifier ../shared/data/glas --method maxmin --out runs/maxmin "
    "--epochs 40 --batch-size 8  |  torchrun --nproc_per_node 4 -m histo_wsl train-classifier ..."
)

#: options that are not training settings (never stored in the config)
_NOT_CONFIG = {"config", "resume", "json_out", "quiet", "ctx"}
#: settings that may change when a run is resumed
_RESUMABLE = {
    "epochs",
    "workers",
    "device",
    "out",
    "data",
    "eval_every",
    "data_on_device",
    "channels_last",
    "time_limit",
}


# Options both training commands take (same name, unit, range and help).
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file of settings (keys = option names); flags override."),
]
FoldOpt = Annotated[int, typer.Option(min=0, help="GlaS fold (splits/fold-K.csv).")]
ValFractionOpt = Annotated[
    float,
    typer.Option(
        min=0.05, max=0.9, help="Share of each class for validation when the data has no split."
    ),
]
EpochsOpt = Annotated[int, typer.Option(min=1, help="Epochs (the paper: 1000).")]
ResizeSizeOpt = Annotated[
    int,
    typer.Option(
        min=8,
        help="Training images are resized to this square, then cropped at random to --crop-size.",
    ),
]
GeometryOpt = Annotated[
    str,
    typer.Option(
        help="squash: images resized to the --resize-size square (the papers' protocol); "
        "isotropic: resized by one factor that keeps their aspect ratio, to the µm/px the card "
        "records, so the network learns tissue as localize reads it from slides.",
    ),
]
GlassOpt = Annotated[
    bool,
    typer.Option(
        "--glass",
        help="Place the training images on glass, as a slide's windows meet tissue at its edges: "
        "half of the images get a random margin of glass, crops that outgrow an image are "
        "filled with glass, and the decoder learns glass as background.",
    ),
]
CropSizeOpt = Annotated[
    int,
    typer.Option(
        min=8,
        help="Network input: the training crop, and the square evaluation images are resized to "
        "(the model card's input size).",
    ),
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Images per step (the papers: 32, on a GPU; the default 16 keeps CPU training of a "
        "MobileNetV2 at 224 px under 6 GB).",
    ),
]
StepSizeOpt = Annotated[int, typer.Option(min=1, help="Epochs between learning-rate drops.")]
GammaOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Learning-rate drop factor.")]
WorkersOpt = Annotated[int, typer.Option(min=0, help="Data-loader processes.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps.")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")]
DeterministicOpt = Annotated[
    bool, typer.Option(help="Deterministic algorithms (slower; exact resume on CPU).")
]
MaxStepsOpt = Annotated[
    int | None, typer.Option(min=1, help="Cap on steps per epoch (quick runs).")
]
ClipGradOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Cap on the global L2 norm of each step's gradients (e.g. 1.0): one bad batch cannot "
        "throw a model trained from scratch off; default no cap.",
    ),
]
EvalEveryOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Validate, select and save last.pt every N epochs (and at the last): long GPU "
        "schedules spend their time training; --resume restarts after the last saved epoch.",
    ),
]
DataOnDeviceOpt = Annotated[
    bool,
    typer.Option(
        "--data-on-device/--no-data-on-device",
        help="Decode the training images once and keep them on the training device, cropping, "
        "flipping and jittering each batch there (a GPU no longer waits for the data loader; "
        "needs the training set in device memory: GlaS takes 17 MB).",
    ),
]
TimeLimitOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Minutes of training after which the run stops at the end of the epoch, saved and "
        "selected as far as it got (a cluster job's wall time); continue with --resume.",
    ),
]
ChannelsLastOpt = Annotated[
    bool,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="Channels-last memory layout (faster convolutions under --amp).",
    ),
]
SkipErrorsOpt = Annotated[
    bool, typer.Option("--skip-errors", help="Leave out unreadable images (listed) and go on.")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the interrupted run in --out exactly.")
]
# k-NN bank and refinement (train-decoder; train-classifier --method maxmin)
KnnKOpt = Annotated[
    int, typer.Option(min=1, rich_help_panel="k-NN", help="Neighbours per pixel (knn).")
]
KnnBankOpt = Annotated[
    int,
    typer.Option(
        min=1,
        rich_help_panel="k-NN",
        help="Training pixels in the knn bank (seed map and --refine knn; the same number "
        "from every image; memory and time grow with it).",
    ),
]
KnnDimsOpt = Annotated[
    int,
    typer.Option(
        min=1,
        rich_help_panel="k-NN",
        help="Principal axes kept per encoder stage in the knn features.",
    ),
]
KnnStagesOpt = Annotated[
    int,
    typer.Option(
        min=1,
        rich_help_panel="k-NN",
        help="The encoder's last stages in the knn features (the shallow ones add the tissue's "
        "fine texture; MobileNetV2 and ResNet have 5, tinycnn and VGG 4).",
    ),
]
RefineOpt = Annotated[
    str,
    typer.Option(
        rich_help_panel="k-NN",
        help="none, or knn: the saved model's map (NEGEV decoder, Max-Min mask) is blended with "
        "a k-NN map, each pixel taking the mean of the trained model's map over its --knn-k "
        "most similar training pixels (the bank, --knn-bank pixels, is kept in the checkpoint; "
        "selection by the blended map's PxAP).",
    ),
]
RefineAlphaOpt = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        rich_help_panel="k-NN",
        help="Weight of the k-NN map in the blend (1: the k-NN map alone, at the CAM layer's "
        "resolution; lower keeps more of the model's own boundaries).",
    ),
]


def explicit_options(ctx: typer.Context, values: dict) -> dict:
    """The options the user actually gave (not defaults), keyed by config field name."""
    out = {}
    for name, value in values.items():
        if name in _NOT_CONFIG:
            continue
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            out[name] = str(value) if isinstance(value, Path) else value
    return out


def _same_value(saved: object, given: object) -> bool:
    """Whether a flag repeats the run's saved setting (numbers by value, paths as text)."""
    if isinstance(saved, bool) or isinstance(given, bool):
        return saved is given
    if isinstance(saved, (int, float)) and isinstance(given, (int, float)):
        return saved == given
    if isinstance(saved, list) or isinstance(given, (list, tuple)):
        return list(saved or []) == list(given or [])
    return saved == given or (saved is not None and str(saved) == str(given))


def classifier_method(name: str):
    """The method ``train-classifier --method NAME`` trains (one whose command is train-classifier).

    Raises:
        InputError: a method trained by another command, or no method of that name.
    """
    from histo_wsl.errors import InputError
    from histo_wsl.methods import METHODS, get_method

    commands = {n: get_method(n).command for n in METHODS}
    if commands.get(name) == "train-classifier":
        return get_method(name)
    names = [n for n, c in commands.items() if c == "train-classifier"]
    elsewhere = f"; {name} is trained with histo-wsl {commands[name]}" if name in commands else ""
    raise InputError(f"--method must be one of {', '.join(names)} (got {name!r}){elsewhere}")


def resolve_config(
    ctx: typer.Context,
    values: dict,
    config: Path | None,
    resume: bool,
    out: Path,
    base: dict | None = None,
):
    """Defaults ← ``base`` ← ``--config`` YAML ← explicit flags; with ``--resume``, the run's own."""
    from histo_wsl.errors import InputError
    from histo_wsl.training.config import load_config, merge_config

    flags = explicit_options(ctx, values)
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise InputError("nothing to resume: no config.yaml in the output folder", out)
        run = load_config(saved)
        changed = [
            f"--{k.replace('_', '-')} {run.get(k)!r} -> {v!r}"
            for k, v in sorted(flags.items())
            if k not in _RESUMABLE and not _same_value(run.get(k), v)
        ]
        if changed:
            raise InputError(
                "--resume continues the run as configured; these options differ from the run's: "
                f"{', '.join(changed)} (only --epochs, --workers, --device, --eval-every, "
                "--data-on-device, --channels-last and --time-limit can change)",
                saved,
            )
        return merge_config(run, flags)
    layers = [base or {}] + ([load_config(config)] if config is not None else [])
    return merge_config(*layers, flags)


@reports_errors
def train_classifier(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(
            help="Patch folder (manifest.csv from extract-patches), <class>/ image folders, a GlaS "
            "folder (train/ + splits/), or a CSV image,label[,mask][,split][,valpx]."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/cam"),
    config: ConfigOpt = None,
    method: Annotated[
        str,
        typer.Option(
            help="cam: a classifier whose CAMs localize; maxmin: Max-Min uncertainty (TMI 2022), "
            "a localizer and a classifier on one backbone, trained through the mask."
        ),
    ] = "cam",
    backbone: Annotated[
        str,
        typer.Option(
            help="resnet50, vgg16, inceptionv3 (paper), resnet18 or mobilenetv2 (CPU-sized); all with "
            "a stride-8 (28×28 at 224 px) last feature map."
        ),
    ] = "mobilenetv2",
    head: Annotated[
        str,
        typer.Option(
            help="Pooling head: wgap (CAM), gap, max, lse, wildcat, mil. Max-Min always uses two "
            "WILDCAT heads."
        ),
    ] = "wgap",
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="ImageNet weights from the torch hub cache ($TORCH_HOME); no download.",
        ),
    ] = True,
    negative_class: Annotated[
        str | None,
        typer.Option(help="Class whose images are fully negative (empty ROI), e.g. normal."),
    ] = None,
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--class", help="Class names in index order (repeat); default: sorted labels."
        ),
    ] = None,
    fold: FoldOpt = 0,
    val_fraction: ValFractionOpt = 0.2,
    data_mpp: Annotated[
        float | None,
        typer.Option(
            metavar="µm/px",
            help="Resolution of the training images (GlaS 0.62, patch folders: from the manifest); "
            "goes into the model card.",
        ),
    ] = None,
    resize_size: ResizeSizeOpt = 256,
    crop_size: CropSizeOpt = 224,
    geometry: GeometryOpt = "squash",
    glass: GlassOpt = False,
    epochs: EpochsOpt = 20,
    batch_size: BatchSizeOpt = 16,
    lr: Annotated[
        float, typer.Option(min=0.0, help="Learning rate of the backbone (SGD Nesterov).")
    ] = 0.003,
    lr_classifier_ratio: Annotated[
        float, typer.Option(min=0.0, help="Learning-rate multiplier of the deep layers and head.")
    ] = 10.0,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    step_size: StepSizeOpt = 250,
    gamma: GammaOpt = 0.1,
    cam_method: Annotated[
        str,
        typer.Option(
            help="Map used for PxAP model selection: cam, gradcam, gradcampp, smoothgradcampp, "
            "xgradcam, layercam."
        ),
    ] = "cam",
    maxmin_lambda: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Weight λ of the background term R(C(X−)) (the original code: 1e-7, which turns "
            "it off; on GlaS validation 0.3 beat 0.1 over 50 epochs, and 0.1 beat 1e-7 and 1 "
            "over 3).",
        ),
    ] = 0.3,
    maxmin_regularizer: Annotated[
        str,
        typer.Option(
            rich_help_panel="Max-Min (--method maxmin)",
            help="R: sem (cross-entropy of C(X−) to the uniform distribution) or eem (its "
            "negative entropy).",
        ),
    ] = "sem",
    maxmin_w: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Steepness w of the mask sigmoid(w·(M̃ − σ)) (unitless).",
        ),
    ] = 5.0,
    maxmin_sigma: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Initial σ, on the per-image min-max normalised map M̃ (0-1).",
        ),
    ] = 0.15,
    maxmin_sigma_step: Annotated[
        float,
        typer.Option(
            min=0.0, rich_help_panel="Max-Min (--method maxmin)", help="σ increase per epoch."
        ),
    ] = 0.001,
    maxmin_sigma_max: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Ceiling of σ.",
        ),
    ] = 0.2,
    maxmin_cl_scale: Annotated[
        float,
        typer.Option(
            min=0.05,
            max=1.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Size factor of the classifier's inputs X± (the paper's code: 0.8; 1 = full "
            "size: two of the three backbone passes per step on 1/0.64 as many pixels).",
        ),
    ] = 0.8,
    maxmin_size: Annotated[
        bool,
        typer.Option(
            "--maxmin-size/--no-maxmin-size",
            rich_help_panel="Max-Min (--method maxmin)",
            help="Size constraints: extended log-barriers keeping foreground and background each "
            "a non-empty fraction of the image.",
        ),
    ] = True,
    elb_t0: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Initial log-barrier t (the barrier switches to linear below a region of 1/t² of "
            "the image).",
        ),
    ] = 5.0,
    elb_t_max: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Max-Min (--method maxmin)",
            help="Ceiling of the log-barrier t.",
        ),
    ] = 10.0,
    elb_mult: Annotated[
        float,
        typer.Option(
            min=1.0, rich_help_panel="Max-Min (--method maxmin)", help="t multiplier per epoch."
        ),
    ] = 1.01,
    refine: RefineOpt = "none",
    refine_alpha: RefineAlphaOpt = 1.0,
    knn_k: KnnKOpt = 128,
    knn_bank: KnnBankOpt = 16384,
    knn_dims: KnnDimsOpt = 64,
    knn_stages: KnnStagesOpt = 2,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and augmentation.")] = 0,
    deterministic: DeterministicOpt = False,
    max_steps_per_epoch: MaxStepsOpt = None,
    clip_grad_norm: ClipGradOpt = None,
    eval_every: EvalEveryOpt = 1,
    data_on_device: DataOnDeviceOpt = False,
    channels_last: ChannelsLastOpt = False,
    time_limit: TimeLimitOpt = None,
    skip_errors: SkipErrorsOpt = False,
    resume: ResumeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a stage-1 model on image-level labels: the CAM classifier, or Max-Min (--method maxmin).

    Writes <out>/best-loc.pt (the checkpoint the next step takes: best PxAP on the validation
    images with masks, or without masks best validation accuracy), best-cls.pt (best val accuracy),
    last.pt, summary.csv (one row per epoch; epoch 0 = before training), config.yaml and run.json;
    a closing summary names the checkpoint to use next and why.
    A Max-Min checkpoint's map is its localizer mask and its class argmax C(X+); localize and
    evaluate take it as they take a CAM checkpoint.
    """
    values = dict(locals())
    cfg = resolve_config(ctx, values, config, resume, out)
    cfg.run.out = str(out)
    summary = classifier_method(cfg.model.method).train(
        cfg, resume=resume, quiet=quiet or json_out, argv=sys.argv
    )
    if json_out:
        print_json(summary)


DECODER_EPILOG = (
    "Examples: histo-wsl train-decoder ../shared/data/glas --classifier runs/cam/best-loc.pt "
    "--out runs/negev --epochs 40  |  histo-wsl train-decoder patches/ --classifier "
    "runs/cam/best-loc.pt --negative-class normal --bg-sampler uniform  |  histo-wsl "
    "train-decoder ../shared/data/glas --classifier runs/cam/best-loc.pt --seed-mode static "
    "--size-lambda 1"
)


@reports_errors
def train_decoder(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(help="The same kinds of data as train-classifier (classes must match)."),
    ],
    classifier: Annotated[
        str | None,
        typer.Option(help="Stage-1 checkpoint (train-classifier's best-loc.pt); frozen."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/negev"),
    config: ConfigOpt = None,
    negative_class: Annotated[
        str | None,
        typer.Option(
            help="Class of fully negative images: all their pixels are pushed to background."
        ),
    ] = None,
    fold: FoldOpt = 0,
    val_fraction: ValFractionOpt = 0.2,
    seeds_fg: Annotated[
        int,
        typer.Option(
            min=1,
            help="Foreground pixels per image and step: drawn ∝ CAM (random) or the highest "
            "(static).",
        ),
    ] = 1,
    seeds_bg: Annotated[
        int,
        typer.Option(
            min=0,
            help="Background pixels per image and step: drawn with --bg-sampler (random) or the "
            "lowest (static); 0 = none (the 'C+ only' ablation).",
        ),
    ] = 1,
    seed_mode: Annotated[
        str,
        typer.Option(
            help="random: seeds drawn anew at every step (the paper); static: the --seeds-fg "
            "highest and --seeds-bg lowest CAM pixels of each crop (ties to the lower row-major "
            "index), same dilation and overlap rule, no randomness (the paper's 'static "
            "selection' ablation).",
        ),
    ] = "random",
    seed_ksize: Annotated[
        int, typer.Option(min=1, help="Each seed dilated to a k×k square (odd).")
    ] = 3,
    seed_lambda: Annotated[float, typer.Option(min=0.0, help="Weight λ of the seed term.")] = 1.0,
    bg_sampler: Annotated[
        str,
        typer.Option(
            help="proportional (∝ 1 − CAM, the paper's intent), uniform (the original code in effect), "
            "lowest (uniform among the --low-fraction lowest-CAM pixels)."
        ),
    ] = "proportional",
    low_fraction: Annotated[float, typer.Option(min=0.01, max=1.0)] = 0.2,
    fg_sampler: Annotated[
        str,
        typer.Option(
            help="proportional (∝ CAM, the paper's probability seeder) or otsu (uniform inside the "
            "CAM's Otsu foreground eroded by --fg-erode; with --bg-sampler lowest it is the "
            "original code's threshold seeder).",
        ),
    ] = "proportional",
    fg_erode: Annotated[
        int, typer.Option(min=1, help="Erosion square of --fg-sampler otsu, in pixels (odd).")
    ] = 11,
    negative_lambda: Annotated[
        float, typer.Option(min=0.0, help="Weight of the negative-image term.")
    ] = 1.0,
    size_lambda: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Size term (off by default, as in the paper)",
            help="Weight of the size term ½ Σ_{bg,fg} ELB(−size) on the decoder's softmax of "
            "non-negative images, sizes as fractions of the image (keeps both regions non-empty); "
            "0 = off. At t = 1 it is flat (zero gradient) and acts as t grows.",
        ),
    ] = 0.0,
    size_t0: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Size term (off by default, as in the paper)",
            help="Initial log-barrier t (the paper: 1).",
        ),
    ] = 1.0,
    size_t_max: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="Size term (off by default, as in the paper)",
            help="Ceiling of t (the paper: 10).",
        ),
    ] = 10.0,
    size_t_mult: Annotated[
        float,
        typer.Option(
            min=1.0,
            rich_help_panel="Size term (off by default, as in the paper)",
            help="t multiplier per epoch (the paper: 1.01); t is saved in last.pt for --resume.",
        ),
    ] = 1.01,
    crf_lambda: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="CRF term (off by default, as in the paper)",
            help="Weight of the colour-affinity term on the decoder's softmax of non-negative "
            "images: neighbours (±2 σ_xy) of similar colour are asked to get the same label "
            "(a windowed dense-CRF loss); 0 = off.",
        ),
    ] = 0.0,
    crf_sigma_rgb: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="CRF term (off by default, as in the paper)",
            help="Colour scale σ_rgb, in 0–255 RGB units (the original code: 15).",
        ),
    ] = 15.0,
    crf_sigma_xy: Annotated[
        float,
        typer.Option(
            min=0.0,
            rich_help_panel="CRF term (off by default, as in the paper)",
            help="Spatial scale σ_xy, in input pixels; the window spans ±2 σ_xy.",
        ),
    ] = 8.0,
    crf_scale: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            rich_help_panel="CRF term (off by default, as in the paper)",
            help="The term is computed on the image and softmax resized by this factor (speed).",
        ),
    ] = 0.25,
    cam_method: Annotated[str, typer.Option(help="CAM method the seeds come from.")] = "cam",
    seed_teacher: Annotated[
        str | None,
        typer.Option(
            help="A train-decoder checkpoint (best-loc.pt) whose foreground map, instead of the "
            "CAM, the seeds are drawn from: a second round of NEGEV, seeded by the first.",
        ),
    ] = None,
    seed_map: Annotated[
        str,
        typer.Option(
            rich_help_panel="k-NN",
            help="What the seeds are drawn from: cam (the CAM of the true class, the paper, or "
            "the --seed-teacher's map) or knn (each pixel gets the mean of that map over its "
            "--knn-k most similar pixels of the other training images, in the frozen encoder's "
            "features: look-alike tissue gets look-alike evidence; pixels of negative-class "
            "images count as 0).",
        ),
    ] = "cam",
    seed_contrast: Annotated[
        bool,
        typer.Option(
            help="With --negative-class: the CAM the seeds (and the k-NN seed map) come from is "
            "the true class's map minus the negative class's map, the evidence the classifier "
            "uses to tell them apart (it may keep it in the negative class's map alone). "
            "--no-seed-contrast: the true class's map alone (the paper).",
        ),
    ] = True,
    knn_k: KnnKOpt = 128,
    knn_bank: KnnBankOpt = 16384,
    knn_dims: KnnDimsOpt = 64,
    knn_stages: KnnStagesOpt = 2,
    refine: RefineOpt = "none",
    refine_alpha: RefineAlphaOpt = 1.0,
    resize_size: ResizeSizeOpt = 256,
    crop_size: CropSizeOpt = 224,
    geometry: GeometryOpt = "squash",
    glass: GlassOpt = False,
    epochs: EpochsOpt = 20,
    batch_size: BatchSizeOpt = 16,
    lr: Annotated[
        float, typer.Option(min=0.0, help="Decoder learning rate (the paper: 0.1).")
    ] = 0.1,
    step_size: StepSizeOpt = 250,
    gamma: GammaOpt = 0.1,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = True,
    seed: Annotated[int, typer.Option(help="Seed of the decoder weights, data order, seeds.")] = 0,
    deterministic: DeterministicOpt = False,
    max_steps_per_epoch: MaxStepsOpt = None,
    clip_grad_norm: ClipGradOpt = None,
    eval_every: EvalEveryOpt = 1,
    data_on_device: DataOnDeviceOpt = False,
    channels_last: ChannelsLastOpt = False,
    time_limit: TimeLimitOpt = None,
    skip_errors: SkipErrorsOpt = False,
    resume: ResumeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the NEGEV decoder over a frozen stage-1 classifier (CAM seeds + negative images).

    Writes <out>/best-loc.pt (self-contained: classifier + decoder; best PxAP on the validation
    images with masks, or without masks the last epoch of the fixed schedule), last.pt,
    summary.csv, config.yaml and run.json; a closing summary names the checkpoint and why.
    """
    from histo_wsl.methods import get_method
    from histo_wsl.methods.negev import STAGE2_DEFAULTS

    values = dict(locals())
    cfg = resolve_config(ctx, values, config, resume, out, base=STAGE2_DEFAULTS)
    cfg.run.out = str(out)
    summary = get_method("negev").train(cfg, resume=resume, quiet=quiet or json_out, argv=sys.argv)
    if json_out:
        print_json(summary)


MIL_EPILOG = (
    "Examples: histo-wsl train-mil patches/ --negative-class normal --out runs/mil  |  "
    "histo-wsl train-classifier runs/mil/pseudo-labels.csv --negative-class normal --out runs/cam"
    "  |  histo-wsl train-decoder runs/mil/pseudo-labels.csv --classifier runs/cam/best-loc.pt "
    "--negative-class normal --out runs/negev"
)


@reports_errors
def train_mil(
    data: Annotated[
        Path,
        typer.Argument(
            help="Patch folder of extract-patches (manifest.csv), one label per slide "
            "(extract-patches --label, or a label column in its CSV list of slides)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/mil"),
    negative_class: Annotated[
        str | None,
        typer.Option(
            help="Class of fully negative slides (e.g. normal); every other class is positive. "
            "Needed unless there are two classes and one is named normal, benign or negative."
        ),
    ] = None,
    backbone: Annotated[
        str,
        typer.Option(
            help="Frozen feature extractor: mobilenetv2, resnet18, resnet50, vgg16, inceptionv3 "
            "(tinycnn: random weights, tests only)."
        ),
    ] = "mobilenetv2",
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="ImageNet weights from the torch hub cache ($TORCH_HOME); no download.",
        ),
    ] = True,
    input_size: Annotated[
        int, typer.Option(min=16, help="Patches are resized to this square (px) for the features.")
    ] = 224,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Patches per feature-extraction batch.")
    ] = 32,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training slides.")] = 40,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate of the MIL model.")] = 1e-3,
    val_data: Annotated[
        Path | None,
        typer.Option(
            "--val-data",
            metavar="PATCHES",
            help="Another extract-patches folder whose slides validate (the instance threshold "
            "and the slide AUC), e.g. other patients'; then every slide of DATA trains.",
            show_default=False,
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            min=0.05, max=0.9, help="Share of each class's slides for validation (by slide)."
        ),
    ] = 0.25,
    negative_fpr: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.99,
            help="t_pos is the smallest instance score that at most this share of the negative "
            "validation slides' patches reach; positive slides' patches at or above it are "
            "labelled positive.",
        ),
    ] = 0.02,
    negative_below: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Label positive slides' patches scoring below this negative (default: they are "
            "left out as ambiguous).",
        ),
    ] = None,
    negative_quantile: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Instead of --negative-below: label positive slides' patches negative when they "
            "score below this quantile of the negative validation slides' patch scores (e.g. 0.5).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the split, the MIL weights, slide order.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Multiple-instance learning from slide labels: instance scores and pseudo patch labels.

    Bags are the slides of a patch folder; a frozen backbone's pooled features describe each patch
    (cached in <out>/features.pt); a DSMIL network (torchmil) learns negative vs positive slides.
    Writes <out>/instances.csv (a score per patch), slides.csv (a score per slide),
    pseudo-labels.csv (a dataset CSV for train-classifier and train-decoder), mil.pt and run.json.
    """
    from histo_wsl.methods.mil import MILParams
    from histo_wsl.methods.mil import train_mil as run

    params = MILParams(
        data=data,
        out=out,
        negative_class=negative_class,
        backbone=backbone,
        pretrained=pretrained,
        input_size=input_size,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        val_fraction=val_fraction,
        val_data=val_data,
        negative_fpr=negative_fpr,
        negative_below=negative_below,
        negative_quantile=negative_quantile,
        seed=seed,
        device=device,
    )
    summary = run(params, quiet=quiet or json_out, argv=sys.argv)
    if json_out:
        print_json(summary)
