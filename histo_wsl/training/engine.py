"""One training engine for every stage: stage-1 classifiers, the NEGEV decoder and Max-Min.

The engine owns what every recipe shares (the timm / torchvision-references shape): device choice,
seeding, the SGD optimizer with its parameter groups, the step schedule, AMP on CUDA, DDP under
``torchrun``, per-epoch evaluation and model selection, ``summary.csv``, checkpoints and exact
``--resume``. A :class:`Task` supplies the model, the loss of a batch and the evaluation.

Reproducibility: every epoch reseeds torch, numpy and the data order from ``(seed, epoch)``, so a run
resumed after epoch *k* draws the same batches and augmentations as one that never stopped.
Checkpoints are written at the end of each epoch (``last.pt``, with optimizer/scheduler state) and
when a selection metric improves (``best-loc.pt``, ``best-cls.pt``; ties go to the later epoch).

Model selection (:class:`Selection`): each kept checkpoint names its criteria in order of preference;
the first one the validation data can measure is used for the whole run. ``best-loc.pt``, the
checkpoint every later step takes, is selected by PxAP on the validation images with masks
(``valpx``) and, when no validation image has a mask (the weakly-supervised case: image labels
only), by the method's mask-free criterion. The card (``selection``), ``run.json`` and the closing
summary say which.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from histo_wsl.errors import FaultError, InputError
from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
from histo_wsl.runtime.atomic import atomic_path, ensure_writable_dir
from histo_wsl.runtime.console import stderr_console
from histo_wsl.runtime.memory import release_freed_memory
from histo_wsl.runtime.record import RunRecord
from histo_wsl.training.config import TrainConfig, save_config

__all__ = [
    "LAST_EPOCH",
    "VAL_ACC",
    "VALPX_PXAP",
    "Criterion",
    "FillingSampler",
    "Selection",
    "Task",
    "TrainingError",
    "fit",
    "resolve_device",
    "seed_everything",
]


class TrainingError(FaultError):
    """Training stopped (e.g. a NaN loss); the last good checkpoint is kept. Exit code 3."""


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A model-selection rule: the epoch whose ``key`` is highest (ties go to the later epoch).

    Attributes:
        key: a column of ``summary.csv`` (a validation metric, or ``epoch``).
        masks: whether it needs validation masks.
        rule: what it selects, in words (card, ``run.json`` and the closing summary).
    """

    key: str
    masks: bool
    rule: str

    def describe(self) -> dict:
        """The card's ``selection`` entry."""
        return {"criterion": self.key, "needs_masks": self.masks, "rule": self.rule}


#: PxAP of the model's map on the validation images with masks
VALPX_PXAP = Criterion(
    "valpx_pxap", True, "highest PxAP on the validation images with masks (valpx)"
)
#: image-level accuracy on the validation split (no masks needed)
VAL_ACC = Criterion(
    "val_acc", False, "highest validation accuracy, ties to the later epoch (no masks needed)"
)
#: the end of the fixed schedule (no masks needed)
LAST_EPOCH = Criterion("epoch", False, "the last epoch of the fixed schedule (no masks needed)")


@dataclasses.dataclass(frozen=True)
class Selection:
    """A kept best checkpoint: its file and its criteria, in order of preference.

    The first criterion that the epoch-0 evaluation reports (e.g. ``valpx_pxap`` only exists when
    validation images have masks) is used for the whole run.
    """

    file: str
    criteria: tuple[Criterion, ...]

    def resolve(self, row: dict) -> Criterion | None:
        """The first criterion ``row`` (an evaluation row) can measure, None if none."""
        for c in self.criteria:
            if _finite_number(row.get(c.key)):
                return c
        return None


class Task(Protocol):
    """What a recipe gives the engine."""

    #: the kept best checkpoints; the first is the one the next step takes
    selection: list[Selection]

    def build_model(self) -> nn.Module:
        """The network (on CPU); the engine moves it to the device."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimizer parameter groups (only trainable parameters)."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training set (items are dicts with tensors)."""

    def training_step(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        """Loss of one batch and float statistics to average over the epoch."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        """Validation metrics (floats) of the current model."""

    def card(self) -> dict:
        """The model card without metrics (the engine adds epoch, metrics and seed)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Schedules of the method itself (e.g. a log-barrier t)."""

    def state_dict(self) -> dict:
        """Task state to resume (schedules)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"--device {name!r} is not auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % 2**31


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class FillingSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, the last incomplete batch filled by repeating samples.

    Under DDP each rank takes every ``world``-th index of the same permutation (padded so all ranks
    see the same number of batches).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of this epoch."""
        self.epoch = epoch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / (self.batch_size * self.world)) * self.batch_size * self.world
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return math.ceil(self.n / (self.batch_size * self.world)) * self.batch_size


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _better(value: float | None, best: float | None) -> bool:
    """Higher is better; ties go to the later epoch; NaN never wins."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or value >= best


def fit(
    cfg: TrainConfig,
    task: Task,
    *,
    resume: bool = False,
    quiet: bool = False,
    argv: list[str] | None = None,
    command: str = "train-classifier",
) -> dict:
    """Train ``task`` under ``cfg``; returns the run summary (best metrics, files, timings).

    Outputs in ``cfg.run.out``: ``config.yaml``, ``summary.csv`` (one row per epoch, epoch 0 = before
    training), the checkpoints of ``task.selection`` and ``last.pt``, and ``run.json``.

    Raises:
        InputError: bad configuration, or ``--resume`` without a resumable run in ``cfg.run.out``.
        TrainingError: the loss became NaN/inf (the epoch and step are named; earlier checkpoints
            stay).
    """
    run = _Run(cfg, task, quiet)
    if resume:
        run.restore()
    elif run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(run.out / "config.yaml", cfg)
    run.prepare_data()
    record = RunRecord(
        run.out / "run.json",
        command,
        params=dataclasses.asdict(cfg),
        argv=argv,
        seed=cfg.run.seed,
        device=str(run.device),
        world_size=run.world,
    )
    t_run = time.perf_counter()
    if run.start_epoch == 1:
        run.print_row(run.evaluate_and_select(0, {}, 0.0))
    deadline = None if cfg.run.time_limit is None else t_run + 60.0 * cfg.run.time_limit
    stopped_after: int | None = None  # the epoch the time limit stopped the run after
    for epoch in range(run.start_epoch, cfg.optim.epochs + 1):
        t0 = time.perf_counter()
        train_stats = run.train_one_epoch(epoch)
        out_of_time = _agreed(
            deadline is not None and time.perf_counter() >= deadline, run.world, run.device
        )
        checkpointed = epoch % cfg.run.eval_every == 0 or epoch == cfg.optim.epochs or out_of_time
        row = run.evaluate_and_select(epoch, train_stats, time.perf_counter() - t0, checkpointed)
        run.print_row(row)
        if run.main and checkpointed:
            run.save_last(epoch, row)
        run.barrier()
        if out_of_time and epoch < cfg.optim.epochs:
            stopped_after = epoch
            break

    summary = run.summary(stopped_after, time.perf_counter() - t_run)
    if run.main:
        record.write(
            ended=True,
            status="done" if stopped_after is None else "stopped",
            summary=summary,
            training_data=task.card().get("training_data"),
        )
        if not quiet:
            _print_closing(run.console, summary, run.history, task.selection[0].file)
    if run.world > 1:
        torch.distributed.destroy_process_group()
    return summary


class _Run:
    """The state of one training run: device, model, optimizer, selection, history.

    :func:`fit` reads as the run's story; this class holds the steps: set-up (here), ``restore``
    (``--resume``), ``prepare_data``, ``train_one_epoch``, ``evaluate_and_select``, ``save_last``
    and ``summary``. The order of set-up steps is the order the random draws depend on.
    """

    def __init__(self, cfg: TrainConfig, task: Task, quiet: bool) -> None:
        self.cfg, self.task = cfg, task
        self.rank, self.world, local_rank = _distributed()
        self.main = self.rank == 0
        if self.main:
            ensure_writable_dir(cfg.run.out)  # before anything is trained
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.run.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
        device = resolve_device(cfg.run.device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.out = Path(cfg.run.out)
        self.last = self.out / "last.pt"
        self.console = stderr_console()
        self.progress_console = self.console if (self.main and not quiet) else None
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(cfg.run.seed)

        self.model = task.build_model().to(device)
        self.channels_last = cfg.run.channels_last and device.type != "mps"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if device.type == "cuda" and not cfg.run.deterministic:
            torch.backends.cudnn.benchmark = (
                True  # fixed input sizes: pick the fastest kernels once
            )
        self.optimizer = torch.optim.SGD(
            task.param_groups(self.model, cfg.optim.lr),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma
        )
        self.use_amp = cfg.run.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch = 1
        #: per kept file: its criterion's key (chosen at the first evaluation), best value, epoch
        self.chosen: dict[str, str | None] = {sel.file: None for sel in task.selection}
        self.best: dict[str, float | None] = {sel.file: None for sel in task.selection}
        self.best_epoch: dict[str, int | None] = {sel.file: None for sel in task.selection}
        self.history: list[dict] = []

    def restore(self) -> None:
        """Continue from ``last.pt``: weights, optimizer, schedule, task state, selection."""
        if not self.last.is_file():
            raise InputError(
                "nothing to resume: no last.pt in the output folder; drop --resume", self.out
            )
        ckpt = load_checkpoint(self.last, map_location="cpu")
        training = ckpt.get("training")
        if not training:
            raise InputError("last.pt has no training state; it cannot be resumed", self.last)
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        self.task.load_state_dict(training.get("task", {}))
        self.start_epoch = int(training["epoch"]) + 1
        self.history = list(training["history"])
        self.chosen, self.best, self.best_epoch = _resumed_selection(
            self.task.selection, training, self.history
        )
        if self.main:
            self.console.print(f"resuming {self.out} after epoch {self.start_epoch - 1}")

    def prepare_data(self) -> None:
        """The DDP wrapper, the training set, its sampler and the loader's settings."""
        cfg = self.cfg
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.dataset = self.task.train_dataset()
        self.sampler = FillingSampler(
            len(self.dataset), cfg.optim.batch_size, cfg.run.seed, self.rank, self.world
        )
        self.on_device = None
        if cfg.run.data_on_device:
            from histo_wsl.data.device_batches import DeviceBatches

            self.on_device = DeviceBatches(
                self.dataset, self.device, cfg.data.crop_size, cfg.data.color_jitter
            )
        self.loader_kwargs: dict[str, Any] = {
            "batch_size": cfg.optim.batch_size,
            "sampler": self.sampler,
            "num_workers": cfg.run.workers,
            "pin_memory": self.device.type == "cuda",
            "drop_last": True,
            "worker_init_fn": _worker_init,
        }
        if cfg.run.workers > 0:
            self.loader_kwargs["persistent_workers"] = False

    def _loader(self, epoch: int) -> Any:
        """This epoch's batches, in the order ``(seed, epoch)`` fixes."""
        cfg = self.cfg
        seed_everything(_epoch_seed(cfg.run.seed, epoch))
        self.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(_epoch_seed(cfg.run.seed, epoch))
        if self.on_device is not None:
            return _Batches(self.on_device, list(self.sampler), cfg.optim.batch_size)
        if cfg.run.workers > 0:
            release_freed_memory(collect=True)  # the workers fork now: a small parent to copy
        return torch.utils.data.DataLoader(self.dataset, generator=g, **self.loader_kwargs)

    def train_one_epoch(self, epoch: int) -> dict:
        """One epoch of steps; returns the mean training statistics (loss first)."""
        cfg, device = self.cfg, self.device
        loader = self._loader(epoch)
        self.ddp_model.train()
        sums: dict[str, float] = {}
        n_steps = 0
        batches = _progress(loader, self.progress_console, epoch, cfg.optim.epochs)
        for step, batch in enumerate(batches, 1):
            if cfg.run.max_steps_per_epoch is not None and step > cfg.run.max_steps_per_epoch:
                break
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            if self.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                loss, stats = self.task.training_step(self.ddp_model, batch, epoch)
            if not torch.isfinite(loss.detach()).item():
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch}, step {step}; training stopped "
                    f"(checkpoints of epoch {epoch - 1} and earlier are kept in {self.out}). "
                    "Lower --lr, or check the data"
                )
            self._step(loss)
            n_steps += 1
            sums["train_loss"] = sums.get("train_loss", 0.0) + loss.detach().float()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        bad = _non_finite_weights(self.model)
        if bad:
            raise TrainingError(
                f"the weights became non-finite at epoch {epoch} ({bad}), although every step's "
                f"loss was finite; training stopped before this epoch was saved or selected "
                f"(checkpoints of epoch {epoch - 1} and earlier are kept in {self.out}). Lower "
                "--lr, or cap the gradients with --clip-grad-norm"
            )
        self.scheduler.step()
        self.task.on_epoch_end(epoch)
        self.barrier()
        return {k: float(v) / max(n_steps, 1) for k, v in sums.items()}

    def _step(self, loss: torch.Tensor) -> None:
        """Backward, the optional gradient cap, and the optimizer step (scaled under AMP)."""
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]],
                self.cfg.optim.clip_grad_norm,
            )
        self.scaler.step(optimizer)
        self.scaler.update()

    def evaluate_and_select(
        self, epoch: int, train_stats: dict, seconds: float, evaluate: bool = True
    ) -> dict:
        """The epoch's row of ``summary.csv``; a kept checkpoint is saved when its metric improves."""
        metrics = self.task.evaluate(self.model, self.device) if self.main and evaluate else {}
        row = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            **train_stats,
            **metrics,
            "seconds": round(seconds, 2),
        }
        if not self.main:
            return row
        self.history.append(row)
        card = self.task.card()
        for sel in self.task.selection if evaluate else ():
            if self.chosen[sel.file] is None:
                crit = sel.resolve(row)
                self.chosen[sel.file] = None if crit is None else crit.key
            crit = _criterion(sel, self.chosen[sel.file])
            if crit is not None and _better(row.get(crit.key), self.best[sel.file]):
                self.best[sel.file], self.best_epoch[sel.file] = float(row[crit.key]), epoch
                save_checkpoint(
                    self.out / sel.file,
                    {
                        **card,
                        "epoch": epoch,
                        "selected_by": crit.key,
                        "selection": crit.describe(),
                        "metrics": metrics,
                        "seed": self.cfg.run.seed,
                    },
                    _cpu_state(self.model),
                )
        _write_summary(self.out / "summary.csv", self.history)
        return row

    def save_last(self, epoch: int, row: dict) -> None:
        """``last.pt``: the weights and everything ``--resume`` needs to continue exactly."""
        save_checkpoint(
            self.last,
            {**self.task.card(), "epoch": epoch, "metrics": dict(row), "seed": self.cfg.run.seed},
            _cpu_state(self.model),
            training={
                "epoch": epoch,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.use_amp else {},
                "task": self.task.state_dict(),
                "selection": self.chosen,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "history": self.history,
                "rng": _rng_state(),
            },
        )

    def summary(self, stopped_after: int | None, seconds: float) -> dict:
        """What the run kept (each checkpoint, its epoch, value and rule) and what to use next."""
        cfg = self.cfg
        kept = {}
        for sel in self.task.selection:
            crit = _criterion(sel, self.chosen[sel.file])
            kept[sel.file] = {
                "path": str(self.out / sel.file) if self.best_epoch[sel.file] is not None else None,
                "epoch": self.best_epoch[sel.file],
                "value": self.best[sel.file],
                **(
                    crit.describe() if crit else {"criterion": None, "rule": "nothing to select by"}
                ),
            }
        use = self.task.selection[0].file
        return {
            "out": str(self.out),
            "epochs": cfg.optim.epochs,
            "epochs_run": stopped_after if stopped_after is not None else cfg.optim.epochs,
            "stopped": None
            if stopped_after is None
            else f"time limit ({cfg.run.time_limit:g} min)",
            "checkpoints": kept,
            "use_next": kept[use]["path"],
            "last": str(self.last),
            "seconds": round(seconds, 1),
            "device": str(self.device),
        }

    def print_row(self, row: dict) -> None:
        """The epoch's numbers on the console (rank 0, not ``--quiet``)."""
        _print_row(self.progress_console, row)

    def barrier(self) -> None:
        """Wait for every rank (distributed runs only)."""
        if self.world > 1:
            torch.distributed.barrier()


def _non_finite_weights(model: nn.Module) -> str | None:
    """The first parameter or buffer holding NaN or inf (its name), None when all are finite."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _criterion(sel: Selection, key: str | None) -> Criterion | None:
    return next((c for c in sel.criteria if c.key == key), None)


def _resumed_selection(
    selection: list[Selection], training: dict, history: list[dict]
) -> tuple[dict, dict, dict]:
    """Chosen criteria, best values and epochs from a ``last.pt`` training state.

    A state written before the criteria were recorded keys its bests by metric; the criterion is
    then re-resolved from the epoch-0 row.
    """
    chosen, best, best_epoch = {}, {}, {}
    saved = training.get("selection") or {}
    for sel in selection:
        if sel.file in saved:
            key = saved[sel.file]
            best[sel.file] = training["best"].get(sel.file)
            best_epoch[sel.file] = training["best_epoch"].get(sel.file)
        else:
            crit = sel.resolve(history[0]) if history else None
            key = None if crit is None else crit.key
            best[sel.file] = training["best"].get(key)
            best_epoch[sel.file] = training["best_epoch"].get(key)
        chosen[sel.file] = key
    return chosen, best, best_epoch


def _print_closing(console: Any, summary: dict, history: list[dict], use: str) -> None:
    """The end-of-training summary: epochs run, the checkpoint to use next and why, its numbers."""
    kept = summary["checkpoints"][use]
    if summary.get("stopped"):
        lines = [
            f"[yellow]Stopped[/yellow] at the {summary['stopped']} after epoch "
            f"{summary['epochs_run']} of {summary['epochs']}, {summary['seconds']:.0f} s; "
            "continue with the same command and --resume."
        ]
    else:
        lines = [f"[green]Done[/green]: {len(history) - 1} epochs in {summary['seconds']:.0f} s."]
    if kept["path"] is None:
        lines.append(f"  No {use} was written: {kept['rule']}.")
    else:
        row = next((r for r in history if r["epoch"] == kept["epoch"]), {})
        numbers = ", ".join(
            f"{k} {v:.4g}"
            for k, v in row.items()
            if k.startswith("val") and isinstance(v, (int, float)) and math.isfinite(v)
        )
        lines.append(f"  Use next:  {kept['path']} (epoch {kept['epoch']}: {kept['rule']})")
        if numbers:
            lines.append(f"  Its validation numbers: {numbers}")
    for name, k in summary["checkpoints"].items():
        if name != use and k["path"] is not None:
            lines.append(f"  Also kept: {k['path']} (epoch {k['epoch']}: {k['rule']})")
    out = Path(summary["out"])
    lines.append(f"  Per epoch: {out / 'summary.csv'}; run record: {out / 'run.json'}")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (distributed runs stop together)."""
    if world <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _write_summary(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _print_row(console: Any, row: dict) -> None:
    if console is None:
        return
    parts = [f"epoch {row['epoch']}"]
    for k, v in row.items():
        if k in ("epoch",):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    console.print("  ".join(parts), highlight=False)


class _Batches:
    """One epoch of :class:`DeviceBatches` over the sampler's indices (sized, for the progress)."""

    def __init__(self, source: Any, indices: list[int], batch_size: int) -> None:
        self.source, self.indices, self.batch_size = source, indices, batch_size

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        return self.source.batches(self.indices, self.batch_size)


def _progress(loader: Any, console: Any, epoch: int, epochs: int) -> Iterator[Any]:
    if console is None:
        yield from loader
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(f"epoch {epoch}/{epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=len(loader))
        for batch in loader:
            yield batch
            bar.advance(task)
