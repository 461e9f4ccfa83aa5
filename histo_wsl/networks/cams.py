"""Class activation maps: CAM and the Grad-CAM family, per-image min-max normalised to [0, 1].

* ``cam``: the head's raw class map (:meth:`Head.cams`; for WGAP Σ_k w_ck A_k, no bias), no ReLU.
* Gradient methods, on the last backbone stage A (the CAM layer) with g = ∂(class logit)/∂A, each followed
  by a ReLU (as torch-cam does):

  - ``gradcam``: w_k = mean_ij g_kij; map = Σ_k w_k A_k.
  - ``gradcampp`` (Grad-CAM++): α_kij = g² / (2 g² + Σ_ij A_kij g³) (0 where the denominator is 0);
    w_k = Σ_ij α_kij ReLU(g_kij).
  - ``smoothgradcampp`` (Smooth Grad-CAM++): as Grad-CAM++, with g, g², g³ each averaged over
    ``n_samples`` (4) copies of the input with Gaussian noise (std ``noise_std`` 0.3, on the normalised
    input); A is the activation of the clean input.
  - ``xgradcam``: w_k = Σ_ij A_kij g_kij / Σ_ij A_kij.
  - ``layercam``: map = Σ_k ReLU(g_k) ⊙ A_k.

With ``against`` (a negative class), the map of a class is its evidence over that class: the
difference of the two raw maps (``cam``), or the gradients of the difference of the two logits.

Maps are computed at the CAM layer's resolution, optionally bilinearly upsampled to ``size``, then
min-max normalised per image (a constant or non-finite map becomes all zeros).

Gradients are taken with :func:`torch.autograd.grad` with respect to a detached copy of A only: the backbone
runs without autograd, and no ``.grad`` is left on any parameter. The model's train/eval mode is left as
it is: call ``model.eval()`` first for deterministic maps (dropout, batch-norm statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.errors import InputError
from histo_wsl.networks.classifier import unwrap

__all__ = ["CAM_METHODS", "compute_cams", "normalize_cams", "range_normalize", "raw_cams"]

CAM_METHODS = ("cam", "gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam")


def normalize_cams(cams: Tensor) -> Tensor:
    """Min-max normalise each map of ``(B, H, W)`` to [0, 1]; constant or non-finite maps become 0.

    Args:
        cams: maps ``(B, H, W)``.

    Returns:
        float32 ``(B, H, W)`` with, per image, min 0 and max 1 (or all zeros).
    """
    x = cams.float()
    flat = x.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(
        ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(x)
    )
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).clamp_(0.0, 1.0)


def _class_grads(
    head: nn.Module, acts: Tensor, classes: Tensor, against: int | None = None
) -> Tensor:
    """∂ logit[b, classes[b]] / ∂ acts[b] for every image (the sum over images separates).

    With ``against``, of ``logit[b, classes[b]] − logit[b, against]``.
    """
    with torch.enable_grad():
        a = acts.detach().clone().requires_grad_(True)
        logits = head(a)
        margin = logits.gather(1, classes.view(-1, 1))
        if against is not None:
            margin = margin - logits[:, against : against + 1]
        score = margin.sum()
        (grad,) = torch.autograd.grad(score, a)
    return grad


def _weighted_sum(weights: Tensor, acts: Tensor) -> Tensor:
    return torch.relu((weights[:, :, None, None] * acts).sum(dim=1))


def _gradcampp(acts: Tensor, g1: Tensor, g2: Tensor, g3: Tensor) -> Tensor:
    denom = 2 * g2 + (acts * g3).sum(dim=(2, 3), keepdim=True)
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
    weights = (alpha * torch.relu(g1)).sum(dim=(2, 3))
    return _weighted_sum(weights, acts)


def _gradient_cam(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    method: str,
    n_samples: int,
    noise_std: float,
    generator: torch.Generator | None,
    acts: Tensor | None = None,
    against: int | None = None,
) -> Tensor:
    """Unnormalised map ``(B, h, w)`` of a Grad-CAM family method (see the module docstring).

    ``acts``: the images' CAM-layer activations if already computed; ``against``: as for
    :func:`compute_cams`.
    """
    head = model.head
    if acts is None:
        with torch.no_grad():
            acts = model.forward_features(images)[-1].detach()
    if method == "smoothgradcampp":
        g1 = torch.zeros_like(acts)
        g2 = torch.zeros_like(acts)
        g3 = torch.zeros_like(acts)
        for _ in range(n_samples):
            noise = torch.randn(
                images.shape, generator=generator, dtype=images.dtype, device=images.device
            )
            with torch.no_grad():
                noisy_acts = model.forward_features(images + noise_std * noise)[-1]
            grad = _class_grads(head, noisy_acts, classes, against)
            g1 += grad
            g2 += grad.pow(2)
            g3 += grad.pow(3)
        return _gradcampp(acts, g1 / n_samples, g2 / n_samples, g3 / n_samples)
    grad = _class_grads(head, acts, classes, against)
    if method == "gradcam":
        return _weighted_sum(grad.mean(dim=(2, 3)), acts)
    if method == "gradcampp":
        return _gradcampp(acts, grad, grad.pow(2), grad.pow(3))
    if method == "xgradcam":
        weights = (grad * acts).sum(dim=(2, 3)) / (acts.sum(dim=(2, 3)) + 1e-7)
        return _weighted_sum(weights, acts)
    return torch.relu((torch.relu(grad) * acts).sum(dim=1))  # layercam


def raw_cams(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    method: str = "cam",
    size: int | tuple[int, int] | None = None,
    *,
    n_samples: int = 4,
    noise_std: float = 0.3,
    generator: torch.Generator | None = None,
    features: Tensor | None = None,
    against: int | None = None,
) -> Tensor:
    """Localization maps of the given classes before any normalisation (see :func:`compute_cams`).

    Works under ``torch.no_grad()`` and ``torch.inference_mode()``: gradient methods enable autograd
    internally.

    Args:
        model: a :class:`~histo_wsl.networks.classifier.WSOLClassifier` (``forward_features``,
            ``cams``, ``head``), possibly wrapped in ``DistributedDataParallel``/``DataParallel``.
        images: normalised images ``(B, 3, H, W)``.
        classes: ``(B,)`` integer class per image (ground truth or predicted).
        method: one of :data:`CAM_METHODS`.
        size: output ``(H, W)`` (or side) for bilinear upsampling; ``None`` keeps the CAM-layer size.
        n_samples: noisy copies for ``smoothgradcampp``.
        noise_std: noise standard deviation for ``smoothgradcampp``.
        generator: random generator for the ``smoothgradcampp`` noise (reproducibility).
        features: the CAM-layer activations of ``images`` (``forward_features(images)[-1]``) when
            the caller already has them (NEGEV's training step): the backbone is then not run again
            (``smoothgradcampp`` still runs it on its noisy copies). Same maps as without.
        against: a class index (a negative class: images where the region of interest is
            absent): each map is then the evidence for the image's class *over* that class, the
            difference of the two raw class maps (``cam``) or the gradient of the difference of
            the two logits (gradient methods). A class map alone is defined only up to a map
            added to every class (the logits' softmax cannot see it), so a classifier may keep
            its evidence in the negative class's map (low on the region of interest) and leave
            the other class's map flat; the difference sees either. Images of the ``against``
            class get all-zero maps.

    Returns:
        float32 ``(B, h, w)`` maps (``h, w`` = CAM-layer size or ``size``), detached.

    Raises:
        InputError: unknown method.
        ValueError: ``classes`` is not a ``(B,)`` integer tensor of valid class indices.
    """
    model = unwrap(model)
    if method not in CAM_METHODS:
        raise InputError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    b = images.shape[0]
    if classes.shape != (b,) or classes.is_floating_point() or classes.is_complex():
        raise ValueError(
            f"classes must be a ({b},) integer tensor, got {classes.dtype} {tuple(classes.shape)}"
        )
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    classes = classes.to(device=images.device, dtype=torch.long)
    num_classes = model.head.num_classes
    if b and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes}), got {classes.tolist()}")

    if against is not None:
        against = int(against)
        if not 0 <= against < num_classes:
            raise ValueError(f"against must lie in [0, {num_classes}), got {against}")
    if features is not None and (features.dim() != 4 or features.shape[0] != b):
        raise ValueError(
            f"features must be the ({b}, C, h, w) CAM-layer activations of the images, got shape "
            f"{tuple(features.shape)}"
        )
    if method == "cam":
        with torch.no_grad():
            if features is None:
                maps = model.cams(images)
            else:
                maps = model.head.cams(features.detach())
            cam = maps[torch.arange(b, device=maps.device), classes]
            if against is not None:
                cam = cam - maps[:, against]
    else:
        with torch.inference_mode(False):  # autograd cannot run on inference tensors
            acts = None if features is None else features.detach().clone()
            cam = _gradient_cam(
                model,
                images.clone(),
                classes.clone(),
                method,
                n_samples,
                noise_std,
                generator,
                acts,
                against,
            )

    cam = cam.detach().float()
    if size is not None:
        out_size = (size, size) if isinstance(size, int) else tuple(size)
        cam = F.interpolate(cam.unsqueeze(1), size=out_size, mode="bilinear", align_corners=False)
        cam = cam.squeeze(1)
    if against is not None:
        cam = cam.masked_fill((classes == against).view(-1, 1, 1), 0.0)
    return cam


def compute_cams(model: nn.Module, images: Tensor, classes: Tensor, *args, **kwargs) -> Tensor:
    """Localization maps of the given classes, per-image min-max normalised to [0, 1].

    :func:`raw_cams` (same arguments) through :func:`normalize_cams`: float32 ``(B, h, w)`` maps
    in [0, 1], detached.
    """
    return normalize_cams(raw_cams(model, images, classes, *args, **kwargs))


def range_normalize(cams: Tensor, lo: float, hi: float) -> Tensor:
    """Maps ``(B, H, W)`` normalised by one range ``(lo, hi)`` for all, clamped to [0, 1].

    The maps of a slide's windows (:func:`histo_wsl.methods.cam.cam_range`): a window without the
    region of interest keeps low values, where its own minimum and maximum would stretch it to
    the full [0, 1].
    """
    return ((cams.float() - lo) / (hi - lo)).nan_to_num_(0.0).clamp_(0.0, 1.0)
