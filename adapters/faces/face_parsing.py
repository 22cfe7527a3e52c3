"""BiSeNet face parsing (facexlib's ``parsing_bisenet.pth``), as PuLID uses it.

PuLID (github:ToTheBeginning/PuLID ``pulid/pipeline*.py``) parses the 512x512
aligned face with facexlib's BiSeNet (19 CelebAMask-HQ classes), turns every
pixel of the classes ``PULID_BACKGROUND_CLASSES`` white and the rest into a
grey image of the face, and feeds that to EVA-CLIP. Note that hair (17), skin,
brows, eyes, glasses, nose and mouth are KEPT; background (0), ears (7, 8),
earrings (9), neck (14), necklace (15), cloth (16) and hat (18) are whitened.

The network is written here from facexlib's architecture
(github:xinntao/facexlib ``facexlib/parsing/bisenet.py``, ``resnet.py``) with
its parameter names, so the published file loads with ``weights_only``:

- ResNet18 (facexlib's own: conv1 7x7/2 + BN + ReLU, maxpool 3/2, layers 1-4
  of two BasicBlocks, strides 1, 2, 2, 2; a 1x1 conv + BN shortcut where the
  shape changes). feat8 = layer2, feat16 = layer3, feat32 = layer4.
- Context path: ``avg = ConvBNReLU1x1(global mean of feat32)``; ``arm(f) =
  ConvBNReLU3x3(f) * sigmoid(BN(conv1x1(global mean)))``;
  ``up32 = head32(nearest_up(arm32(feat32) + avg))``, ``up16 = head16(nearest_up(arm16(feat16) + up32))``.
- Feature fusion: ``f = ConvBNReLU1x1([feat8 ; up16])``; ``f + f * sigmoid(conv2(relu(conv1(global mean f))))``.
- Output: ``conv_out(ConvBNReLU3x3(f))`` (1x1, 19 classes), bilinearly resized
  (align_corners=True) to the input size. ``conv_out16`` / ``conv_out32``
  (auxiliary training heads) are loaded but not needed for the labels.

Input: RGB in [0, 1] normalised with ImageNet's mean/std (PuLID's call).
"""

from __future__ import annotations

from typing import Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 19
PARSE_SIZE = 512  # facexlib's FaceRestoreHelper(face_size=512) crop, which PuLID parses
PULID_BACKGROUND_CLASSES = (0, 16, 18, 7, 8, 9, 14, 15)
"""``bg_label`` in PuLID's ``get_id_embedding``: background, cloth, hat, ears, earring, neck, necklace."""


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + r)


def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _layer(64, 64, 1)
        self.layer2 = _layer(64, 128, 2)
        self.layer3 = _layer(128, 256, 2)
        self.layer4 = _layer(256, 512, 2)

    def forward(self, x) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


def _global_mean(x):
    return x.mean(dim=(2, 3), keepdim=True)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(feat))))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = F.interpolate(self.conv_avg(_global_mean(feat32)), feat32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        return feat + feat * torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(feat)))))


class ParsingOutput(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``forward(x [B, 3, H, W] ImageNet-normalised)`` -> logits ``[B, 19, H, W]`` (the main head)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = ParsingOutput(256, 256, num_classes)
        self.conv_out16 = ParsingOutput(128, 64, num_classes)
        self.conv_out32 = ParsingOutput(128, 64, num_classes)

    def forward(self, x):
        feat8, up16, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, up16))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "BiSeNet":
        """facexlib's key layout; BatchNorm ``num_batches_tracked`` counters are optional. ``ValueError`` otherwise."""
        if "cp.resnet.conv1.weight" not in state or "conv_out.conv_out.weight" not in state:
            raise ValueError("not facexlib's BiSeNet face-parsing network (no cp.resnet.conv1.weight / conv_out.conv_out.weight)")
        model = cls(int(state["conv_out.conv_out.weight"].shape[0]))
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                "the file does not have facexlib's BiSeNet layout"
                + (f"; missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}" if missing else "")
                + (f"; unexpected {len(unexpected)}, e.g. {', '.join(unexpected[:3])}" if unexpected else "")
            )
        return model.eval()


def parse_labels(model: BiSeNet, faces: torch.Tensor) -> torch.Tensor:
    """``faces`` ``[B, 3, H, W]`` RGB in [0, 1] -> class labels ``[B, H, W]`` (argmax of the main head)."""
    p = next(model.parameters())
    x = faces.to(p.device, torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return model(((x - mean) / std).to(p.dtype)).argmax(dim=1)


def background_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: the pixels PuLID whitens."""
    bg = torch.zeros_like(labels, dtype=torch.bool)
    for c in PULID_BACKGROUND_CLASSES:
        bg |= labels == c
    return bg
