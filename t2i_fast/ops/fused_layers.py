"""conv → BatchNorm2d (→ activation) as modules: ``ConvBNAct``, one layer computed by
``t2i_fast.ops.conv_bn_act``; ``conv_bn_act_layers``, the triples of a model that qualify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i_fast.ops.conv_bn_act import IMPLS, KINDS, conv_bn_act


# -- one layer ------------------------------------------------------------------------------
def _square(value, what: str) -> int:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if pair[0] != pair[1]:
        raise ValueError(f"{what} must be square, got {pair}")
    return int(pair[0])


def _check_modules(conv: nn.Module, bn: nn.Module) -> None:
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        raise TypeError(f"conv must be nn.Conv2d or nn.ConvTranspose2d, got {type(conv)}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be nn.BatchNorm2d, got {type(bn)}")
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("groups, dilation and padding modes other than zeros are not supported")
    if isinstance(conv, nn.ConvTranspose2d) and tuple(conv.output_padding) != (0, 0):
        raise ValueError("output_padding is not supported")
    if isinstance(conv.padding, str):
        raise ValueError(f"padding={conv.padding!r} is not supported; give it in pixels")
    if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
        raise ValueError("bn needs affine=True, track_running_stats=True and a float momentum")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features, conv {conv.out_channels} outputs")


class ConvBNAct(nn.Module):
    """conv → BatchNorm2d → LeakyReLU(slope) (slope 0: ReLU; None: no activation) as one
    ``conv_bn_act`` call. Holds an ``nn.Conv2d``/``nn.ConvTranspose2d`` as ``conv`` and an
    ``nn.BatchNorm2d`` as ``bn``; ``from_modules`` wraps existing ones, sharing their
    parameters and buffers. Training counts batches in ``bn.num_batches_tracked`` as
    BatchNorm2d does."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, bias: bool = False,
                 slope: float | None = 0.2, momentum: float = 0.1, eps: float = 1e-5,
                 impl: str = "auto", device=None, dtype=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        layer = nn.ConvTranspose2d if kind == "conv_transpose" else nn.Conv2d
        factory = {"device": device, "dtype": dtype}
        self._set(layer(in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                        **factory),
                  nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory),
                  slope, impl)

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module, slope: float | None, *,
                     impl: str = "auto") -> ConvBNAct:
        """The layer that computes ``act(bn(conv(x)))`` with these very modules."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set(conv, bn, slope, impl)
        return self

    def _set(self, conv: nn.Module, bn: nn.Module, slope: float | None, impl: str) -> None:
        _check_modules(conv, bn)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.conv = conv
        self.bn = bn
        self.kind = "conv_transpose" if isinstance(conv, nn.ConvTranspose2d) else "conv"
        self.stride = _square(conv.stride, "stride")
        self.padding = _square(conv.padding, "padding")
        self.slope = slope
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.bn.num_batches_tracked.add_(1)
        return conv_bn_act(x, self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias,
                           self.bn.running_mean, self.bn.running_var, kind=self.kind,
                           stride=self.stride, padding=self.padding, slope=self.slope,
                           training=self.training, momentum=self.bn.momentum, eps=self.bn.eps,
                           impl=self.impl)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, slope={self.slope}, impl={self.impl!r}"


# -- the layers of a model ------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One conv → BatchNorm2d (→ activation) triple of a model, with its input size."""

    name: str  # the convolution's qualified name in the model
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    height: int
    width: int
    slope: float | None


def _activation_slope(module: nn.Module | None) -> float | None:
    if isinstance(module, nn.LeakyReLU):
        return module.negative_slope
    if isinstance(module, nn.ReLU):
        return 0.0
    return None


def conv_bn_act_layers(model: nn.Module, *inputs: torch.Tensor) -> list[LayerShape]:
    """Every Conv2d/ConvTranspose2d directly followed by a BatchNorm2d inside an
    nn.Sequential of ``model`` whose BatchNorm takes that convolution's output when
    ``model(*inputs)`` runs (meta tensors will do), with the activation after the BatchNorm
    (LeakyReLU: its slope, ReLU: 0, anything else: None) and the input size seen."""
    candidates = {}  # conv → (bn, slope)
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        for i, conv in enumerate(children[:-1]):
            if (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d))
                    and isinstance(children[i + 1], nn.BatchNorm2d)):
                after = children[i + 2] if i + 2 < len(children) else None
                candidates[conv] = (children[i + 1], _activation_slope(after))
    sizes, outputs, confirmed = {}, {}, set()

    def conv_input(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[2:]))

    def conv_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[candidates[module][0]] = (module, output)

    def bn_input(module: nn.Module, args: tuple) -> None:
        conv, output = outputs.get(module, (None, None))
        if args[0] is output:
            confirmed.add(conv)

    hooks = [conv.register_forward_pre_hook(conv_input) for conv in candidates]
    hooks += [conv.register_forward_hook(conv_output) for conv in candidates]
    hooks += [bn.register_forward_pre_hook(bn_input) for bn, _ in candidates.values()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for name, conv in model.named_modules():
        if conv in confirmed:
            kind = "conv_transpose" if isinstance(conv, nn.ConvTranspose2d) else "conv"
            layers.append(LayerShape(name, kind, conv.in_channels, conv.out_channels,
                                     _square(conv.kernel_size, "kernel_size"),
                                     _square(conv.stride, "stride"),
                                     _square(conv.padding, "padding"), *sizes[conv],
                                     candidates[conv][1]))
    return layers
