"""The NEGEV model (MIDL 2022): a frozen stage-1 classifier with a U-Net decoder on its encoder.

method.md §1.2: the decoder takes the backbone's stages (deepest = head, the others = skips, the
full-resolution stage dropped); each block upsamples ×2 (nearest), resizes bilinearly to the skip
when the sizes differ (ResNet/MobileNet stages 3-5 are all at stride 8), concatenates the skip and
applies two Conv3×3-BN-ReLU; blocks are added without skip until the input resolution is reached.
A Conv3×3 segmentation head gives 2 channels (background, foreground); the foreground map is the
softmax's channel 1. VGG16 gets the centre block of the paper (two Conv-BN-ReLU at 1024 channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.networks.classifier import WSOLClassifier
from histo_wsl.networks.knn import KNNRefiner

__all__ = ["NEGEVModel", "UNetDecoder", "decoder_channels", "upsample"]

_CHANNELS = (256, 128, 64, 32, 16)


def decoder_channels(n_blocks: int, width: float = 1.0) -> tuple[int, ...]:
    """The paper's channel plan: (256, 128, 64, 32, 16) truncated (VGG16: 256, 128, 64).

    ``width`` scales it for small backbones (``tinycnn``: 0.25), never below 4 channels a block.
    """
    plan = _CHANNELS + (16,) * max(0, n_blocks - len(_CHANNELS))
    return tuple(max(4, int(round(c * width))) for c in plan[:n_blocks])


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``batch``: BatchNorm2d; ``group``: GroupNorm with up to 8 groups (no running statistics)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.BatchNorm2d(channels)


def _conv_bn_relu(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        norm_layer(norm, cout),
        nn.ReLU(inplace=True),
    )


def _resize_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) matrix of a ×2 nearest upsampling followed by a bilinear resize to ``n_out``.

    The bilinear step samples the upsampled row (length ``2·n_in``) with ``align_corners=True``,
    as :func:`torch.nn.functional.interpolate` does; each upsampled entry ``q`` is input ``q // 2``.
    """
    up = 2 * n_in
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = (up - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = scale * i
        i0 = min(int(src), up - 1)
        frac = src - i0
        i1 = i0 + 1 if i0 < up - 1 else i0
        a[i, i0 // 2] += 1.0 - frac
        a[i, i1 // 2] += frac
    return a


def upsample(x: Tensor, target: tuple[int, int] | None) -> Tensor:
    """``x`` upsampled ×2 (nearest), then resized bilinearly (``align_corners``) to ``target``.

    A U-Net block over a stride-8 backbone meets skips at its own resolution (MobileNetV2's and
    ResNet's stages 3–5 are all at stride 8): the ×2 upsampling is then resized straight back.
    Both steps are linear along each axis, so they are applied as one small matrix per axis
    (:func:`_resize_matrix`) on the input: the same values to float rounding, without building
    the 4×-larger upsampled tensor (on MobileNetV2's 1,280-channel CAM layer that copy cost
    more than the block's convolutions).
    """
    h, w = x.shape[-2:]
    if target is None or (target[0] == 2 * h and target[1] == 2 * w):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    ah = _resize_matrix(h, target[0]).to(device=x.device, dtype=x.dtype)
    aw = _resize_matrix(w, target[1]).to(device=x.device, dtype=x.dtype)
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.matmul(torch.matmul(ah, x), aw.T)
    # channels-last (inference on CPU): rows of (w·c) and (c) values are contiguous
    b, c = x.shape[:2]
    y = torch.matmul(ah, x.permute(0, 2, 3, 1).reshape(b, h, w * c))
    y = torch.matmul(aw, y.reshape(b * target[0], w, c))
    return y.reshape(b, target[0], target[1], c).permute(0, 3, 1, 2)


class _Block(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout, norm)
        self.conv2 = _conv_bn_relu(cout, cout, norm)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int] | None) -> Tensor:
        target = skip.shape[-2:] if skip is not None else size
        x = upsample(x, None if target is None else (int(target[0]), int(target[1])))
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """U-Net decoder over backbone stages, ending with a 2-channel segmentation head.

    Args:
        stage_channels: channels of the backbone stages, shallow to deep.
        stage_strides: their strides relative to the input.
        center: add the VGG-style centre block at the deepest stage.
        width: scale of the channel plan (see :func:`decoder_channels`).
        norm: normalisation of the conv blocks, ``batch`` or ``group`` (see :func:`norm_layer`).
    """

    def __init__(
        self,
        stage_channels: list[int],
        stage_strides: list[int],
        center: bool = False,
        width: float = 1.0,
        norm: str = "batch",
    ):
        super().__init__()
        keep = [i for i, s in enumerate(stage_strides) if s > 1]
        channels = [stage_channels[i] for i in keep]
        strides = [stage_strides[i] for i in keep]
        head_c = channels[-1]
        skips = channels[:-1][::-1]
        extra = int(round(math.log2(strides[0]))) if strides else 0
        n_blocks = len(skips) + extra
        plan = decoder_channels(n_blocks, width)
        self.keep = keep
        self.center = (
            nn.Sequential(_conv_bn_relu(head_c, head_c, norm), _conv_bn_relu(head_c, head_c, norm))
            if center
            else None
        )
        blocks = []
        cin = head_c
        for i in range(n_blocks):
            skip_c = skips[i] if i < len(skips) else 0
            blocks.append(_Block(cin, skip_c, plan[i], norm))
            cin = plan[i]
        self.blocks = nn.ModuleList(blocks)
        self.n_skips = len(skips)
        self.seg_head = nn.Conv2d(cin, 2, 3, padding=1)
        self.channels = plan
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.seg_head:
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.seg_head.weight)
        nn.init.zeros_(self.seg_head.bias)

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        """2-channel logits at ``size`` from the backbone stages."""
        feats = [stages[i] for i in self.keep]
        x = feats[-1]
        if self.center is not None:
            x = self.center(x)
        skips = feats[:-1][::-1]
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x, skips[i] if i < self.n_skips else None, size if last else None)
        logits = self.seg_head(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class NEGEVModel(nn.Module):
    """Frozen stage-1 classifier + trainable U-Net decoder.

    ``forward(x)`` returns the frozen classifier's logits (image class); :meth:`segment` the
    decoder's 2-channel logits; :meth:`localize` the foreground probability map (B,H,W).
    The classifier is kept in eval mode (BatchNorm statistics frozen) whatever ``train()`` says.
    With a ``refiner`` (``train-decoder --refine knn``), :meth:`localize` returns the decoder's
    map blended with its k-NN map over training pixels (:mod:`histo_wsl.networks.knn`).
    """

    def __init__(self, classifier: WSOLClassifier, refiner: KNNRefiner | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.refiner = refiner
        bb = classifier.backbone
        self.decoder = UNetDecoder(
            list(bb.stage_channels),
            list(bb.stage_strides),
            center=bb.name == "vgg16",
            width=bb.decoder_width,
            norm=bb.norm,
        )
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.classifier.eval()

    def train(self, mode: bool = True) -> NEGEVModel:
        """Train the decoder; the classifier stays in eval mode."""
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(
        self, x: Tensor, segment: bool = False, features: bool = False
    ) -> Tensor | tuple[Tensor, ...]:
        """Image-class logits of the frozen classifier; with ``segment``, :meth:`segment`'s tuple.

        (Training goes through ``forward(x, segment=True)`` so that DistributedDataParallel sees
        the call.)
        """
        if segment:
            return self.segment(x, features=features)
        return self.classifier(x)

    def segment(self, x: Tensor, features: bool = False) -> tuple[Tensor, ...]:
        """(classifier logits, decoder 2-channel logits at the input size).

        With ``features``, also the list of the frozen encoder's stage activations (detached; the
        last is the CAM layer), from which the training step takes its seeds without a second
        backbone pass.
        """
        with torch.no_grad():
            stages = self.classifier.forward_features(x)
            logits = self.classifier.head(stages[-1])
        stages = [s.detach() for s in stages]
        seg = self.decoder(stages, tuple(x.shape[-2:]))
        return (logits, seg, stages) if features else (logits, seg)

    def localize(self, x: Tensor, refine: bool = True) -> tuple[Tensor, Tensor]:
        """(classifier logits, foreground probability (B,H,W)).

        With a ready refiner and ``refine``, the map is the refiner's blend (with ``alpha`` 1 the
        k-NN map alone, and the decoder is not run); otherwise the decoder's own.
        """
        refiner = self.refiner
        if refine and refiner is not None and refiner.ready and refiner.alpha == 1.0:
            # the blend is the k-NN map alone: the decoder's map would be weighted 0
            with torch.no_grad():
                stages = self.classifier.forward_features(x)
                logits = self.classifier.head(stages[-1])
            knn = refiner.knn_map([s.detach() for s in stages], tuple(x.shape[-2:]))
            return logits, knn.float().clamp(0.0, 1.0)
        logits, seg, stages = self.segment(x, features=True)
        return logits, self.foreground(seg, stages, refine)

    def foreground(self, seg: Tensor, stages: list[Tensor], refine: bool = True) -> Tensor:
        """Foreground map (B,H,W) of the decoder's logits ``seg`` (refined, see :meth:`localize`)."""
        fg = seg.float().softmax(1)[:, 1]
        if refine and self.refiner is not None and self.refiner.ready:
            fg = self.refiner(fg, stages)
        return fg
