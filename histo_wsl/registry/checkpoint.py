"""histo-wsl checkpoints: one ``.pt`` file with a model card, loaded without running code.

Format (DESIGN.md §3): ``{"format": "histo-wsl/1", "card": {...}, "state_dict": {...}}`` plus, in
training checkpoints (``last.pt``), a ``"training"`` entry with the optimizer, scheduler and RNG
states used by ``--resume``. Everything is saved as tensors and plain Python values so that
``torch.load(path, weights_only=True)`` reads it: a checkpoint from elsewhere cannot run code.

Compact copies (``histo-wsl models export``) store floating weights in fp16; :func:`load_checkpoint`
casts them back to fp32, so every model is built, trained and run in fp32 as usual (CPU included).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from histo_wsl.errors import InputError
from histo_wsl.runtime.atomic import atomic_path

__all__ = ["FORMAT", "load_checkpoint", "save_checkpoint"]

FORMAT = "histo-wsl/1"


def save_checkpoint(path: str | Path, card: dict, state_dict: dict, **extra: Any) -> Path:
    """Write a checkpoint atomically (a partial file never carries the final name).

    Args:
        path: destination ``.pt`` file.
        card: the model card (plain JSON-like values).
        state_dict: model weights.
        **extra: more top-level entries (e.g. ``training`` for resume); plain values and tensors.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {"format": FORMAT, "card": card, "state_dict": state_dict, **extra}
    with atomic_path(path, needed=_tensor_bytes(payload)) as tmp:
        torch.save(payload, tmp)
    return path


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload (what its file needs, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a histo-wsl checkpoint with ``weights_only=True``.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go.

    Returns:
        The checkpoint dict (``format``, ``card``, ``state_dict``, maybe ``training``); fp16 or
        bf16 weights (compact exports) are cast back to fp32.

    Raises:
        InputError: missing file, not a torch file, a pickle that needs code to load, or a torch
            file that is not a histo-wsl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found; give the .pt file a training run wrote", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "Weights only load failed" in text:
            # the weights_only unpickler met a class or function: loading would run code
            raise InputError(
                "refused: the file needs arbitrary code to load, so it is not a histo-wsl "
                "checkpoint (histo-wsl never loads such files); use a .pt file written by histo-wsl",
                path,
            ) from None
        raise InputError(
            f"not a readable PyTorch checkpoint ({_first_line(exc)}); is the file complete?", path
        ) from None
    except Exception as exc:  # torch raises many types for a file that is not its format
        raise InputError(
            f"not a readable PyTorch checkpoint ({_first_line(exc)}); is the file complete?",
            path,
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "card" not in ckpt:
        raise InputError(
            f"not a histo-wsl checkpoint (no format {FORMAT!r} and model card); use a .pt file "
            "written by histo-wsl train-classifier or train-decoder",
            path,
        )
    state = ckpt.get("state_dict")
    if isinstance(state, dict):
        ckpt["state_dict"] = {
            k: v.float()
            if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16)
            else v
            for k, v in state.items()
        }
    return ckpt
