"""conv → BatchNorm2d (→ activation) as modules: ``ConvBNAct``, one layer computed by
``t2i_fast.ops.conv_bn_act``; ``conv_bn_act_layers``, the triples of a model that qualify,
and ``conv_bn_act_chains``, the runs of them each reading the previous one's activation;
``fuse_conv_bn_act``, which makes chosen triples of a model fused layers in place, its
parameters, buffers and state-dict keys unchanged (``FusedSequential``), and chains chosen
runs (each layer's BatchNorm and activation applied in the next one's prologue);
``choose_fused_layers``, which does both where the measured dispatch says they make the
captured training step faster (``--fused-layers auto|on|off``), with the evidence.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from t2i_fast.ops import dispatch
from t2i_fast.ops.conv_bn_act import (
    IMPLS,
    KINDS,
    compiled_for_timing,
    conv_bn_act,
    conv_bn_stats,
    measure_dispatch,
    parity_tolerance,
)
from t2i_fast.ops.dispatch import Timer


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
    BatchNorm2d does. The convolution's weight and bias are cast to the input's dtype, as
    autocast would cast them for an unfused convolution."""

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

    def _operands(self, x: torch.Tensor) -> tuple:
        if self.training:
            self.bn.num_batches_tracked.add_(1)
        # The kernels take x, weight and bias in one dtype, and autocast does not cast for a
        # custom op: under bfloat16 autocast the input is bfloat16, the weights float32.
        weight = self.conv.weight.to(x.dtype)
        bias = self.conv.bias.to(x.dtype) if self.conv.bias is not None else None
        return (x, weight, bias, self.bn.weight, self.bn.bias, self.bn.running_mean,
                self.bn.running_var)

    def forward(self, x: torch.Tensor, *, in_scale: torch.Tensor | None = None,
                in_shift: torch.Tensor | None = None,
                in_slope: float | None = None) -> torch.Tensor:
        """The layer on x, or with ``in_scale``/``in_shift`` on act(x·in_scale + in_shift):
        x is then the previous layer's ``stats`` output, its BatchNorm and activation
        applied as this layer's GEMM loads it (``conv_bn_act``'s prologue)."""
        return conv_bn_act(*self._operands(x), kind=self.kind, stride=self.stride,
                           padding=self.padding, slope=self.slope, training=self.training,
                           momentum=self.bn.momentum, eps=self.bn.eps, impl=self.impl,
                           in_scale=in_scale, in_shift=in_shift, in_slope=in_slope)

    def stats(self, x: torch.Tensor, *, in_scale: torch.Tensor | None = None,
              in_shift: torch.Tensor | None = None, in_slope: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training only: (z, scale, shift), the convolution's output and the BatchNorm of
        its batch statistics as a per-channel affine (``conv_bn_stats``), for the next
        layer to apply with ``self.slope`` as its prologue: this layer's activation is
        never written. Updates the running statistics as ``forward`` does."""
        if not self.training:
            raise ValueError("ConvBNAct.stats is for training (batch statistics)")
        return conv_bn_stats(*self._operands(x), kind=self.kind, stride=self.stride,
                             padding=self.padding, momentum=self.bn.momentum, eps=self.bn.eps,
                             impl=self.impl, in_scale=in_scale, in_shift=in_shift,
                             in_slope=in_slope)

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
    # The layer whose activation (or BatchNorm output, slope None) this one's convolution
    # reads directly, the next child of the same nn.Sequential: a link of a chain.
    follows: str | None = None


def _span(slope: float | None) -> int:
    """How many children of its nn.Sequential a layer is: conv, BatchNorm (, activation)."""
    return 2 if slope is None else 3


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
    (LeakyReLU: its slope, ReLU: 0, anything else: None), the input size seen and, where the
    convolution takes the output of the child just before it (the previous such layer's
    activation, or its BatchNorm's when it has none), the previous layer (``follows``)."""
    candidates = {}  # conv → (bn, slope)
    previous = {}  # conv → (the previous layer's conv, the child whose output it reads)
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        starts = {}  # position → conv, of this Sequential's candidates
        for i, conv in enumerate(children[:-1]):
            if (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d))
                    and isinstance(children[i + 1], nn.BatchNorm2d)):
                after = children[i + 2] if i + 2 < len(children) else None
                candidates[conv] = (children[i + 1], _activation_slope(after))
                starts[i] = conv
        for i, conv in starts.items():
            end = i + _span(candidates[conv][1])
            if end in starts:
                previous[starts[end]] = (conv, children[end - 1])
    sizes, outputs, confirmed = {}, {}, set()
    fed, linked = {}, set()  # previous layer's last child → its latest output; conv

    def conv_input(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[2:]))
        if module in previous and args[0] is fed.get(previous[module][1]):
            linked.add(module)

    def conv_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[candidates[module][0]] = (module, output)

    def bn_input(module: nn.Module, args: tuple) -> None:
        conv, output = outputs.get(module, (None, None))
        if args[0] is output:
            confirmed.add(conv)

    def last_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        fed[module] = output

    hooks = [conv.register_forward_pre_hook(conv_input) for conv in candidates]
    hooks += [conv.register_forward_hook(conv_output) for conv in candidates]
    hooks += [bn.register_forward_pre_hook(bn_input) for bn, _ in candidates.values()]
    hooks += [last.register_forward_hook(last_output)
              for last in {last for _, last in previous.values()}]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    names = {conv: name for name, conv in model.named_modules() if conv in confirmed}
    layers = []
    for conv, name in names.items():
        kind = "conv_transpose" if isinstance(conv, nn.ConvTranspose2d) else "conv"
        before = previous.get(conv, (None,))[0]
        layers.append(LayerShape(name, kind, conv.in_channels, conv.out_channels,
                                 _square(conv.kernel_size, "kernel_size"),
                                 _square(conv.stride, "stride"),
                                 _square(conv.padding, "padding"), *sizes[conv],
                                 candidates[conv][1],
                                 names.get(before) if conv in linked else None))
    return layers


def conv_bn_act_chains(layers: list[LayerShape]) -> list[list[LayerShape]]:
    """The runs of two or more ``layers`` each of which follows the one before it."""
    chains: list[list[LayerShape]] = []
    for layer in layers:
        if chains and layer.follows is not None and chains[-1][-1].name == layer.follows:
            chains[-1].append(layer)
        else:
            chains.append([layer])
    return [chain for chain in chains if len(chain) > 1]


# -- fusing the layers of a model -----------------------------------------------------------
class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` some of whose conv → BatchNorm2d (→ activation) runs are, in
    training, one ``ConvBNAct`` call each: ``fused`` maps the index of such a run's
    convolution to its layer. The layers share the children's parameters and buffers but are
    not registered, so parameters, buffers and state-dict keys are the children's alone.

    ``chained``: indices of fused layers whose next child is another fused layer and which
    hand their output to it through its prologue: the layer runs as ``ConvBNAct.stats``,
    writing only its convolution's output and its BatchNorm as a per-channel (scale, shift),
    and the next one applies that BatchNorm and the activation as its GEMM loads the input,
    so the normalised activation is never written. The same outputs, gradients and running
    statistics as the unchained layers.

    In eval mode the children run one by one, as in a plain ``nn.Sequential`` (the
    reference), chained or not."""

    def __init__(self, *args, fused: dict[int, ConvBNAct] | None = None,
                 chained: Iterable[int] = ()):
        super().__init__(*args)
        self.fused = dict(fused or {})
        self.chained = frozenset(chained)
        for i in self.chained:
            layer = self.fused.get(i)
            if layer is None or i + _span(layer.slope) not in self.fused:
                raise ValueError(f"child {i} is chained: it and the child after its "
                                 f"BatchNorm and activation must be fused layers")

    def train(self, mode: bool = True) -> FusedSequential:
        super().train(mode)
        for layer in self.fused.values():  # unregistered: Module.train does not reach them
            layer.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        children = list(self)
        prologue: dict = {}  # the previous layer's BatchNorm and activation, still to apply
        i = 0
        while i < len(children):
            layer = self.fused.get(i)
            if layer is None:
                x = children[i](x)
                i += 1
                continue
            if i in self.chained:
                x, scale, shift = layer.stats(x, **prologue)  # x: its convolution's output
                prologue = {"in_scale": scale, "in_shift": shift, "in_slope": layer.slope}
            else:
                x = layer(x, **prologue)
                prologue = {}
            i += _span(layer.slope)  # past the BatchNorm and activation
        return x


# chain(run, wanted, x) → whether to chain the run (see fuse_conv_bn_act).
Chain = Callable[["FusedSequential", list[bool], torch.Tensor], bool]


def fuse_conv_bn_act(model: nn.Module, *inputs: torch.Tensor, impl: str,
                     wanted: Callable[[nn.Module, nn.Module, float | None, torch.Tensor], bool],
                     chain: Chain | None = None) -> list[str]:
    """Makes each conv → BatchNorm2d (→ activation) of ``model`` found by
    ``conv_bn_act_layers`` that ``ConvBNAct`` takes one ``ConvBNAct(impl=impl)`` call in
    training where ``wanted(conv, bn, slope, x)`` is true, x an input the convolution gets in
    ``model(*inputs)``: the ``nn.Sequential`` holding it becomes a ``FusedSequential`` of the
    same modules, so parameters, state-dict keys and checkpoints do not change. Returns the
    fused convolutions' names. In eval mode the fused layers run unfused.

    ``chain``: asked, after ``wanted`` of each layer, about every run of two or more such
    layers of one Sequential each reading the previous one's activation (``follows``):
    ``chain(run, wanted_flags, x)`` with ``run`` a ``FusedSequential`` of the run's modules
    (the model's own; every layer fused, none chained), ``wanted``'s answers and the first
    layer's input. True: the whole run is fused and chained (``FusedSequential.chained``)."""
    seen: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda module, args: seen.setdefault(module, args[0]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    was_training = model.training
    model.eval()  # finding the layers runs the model: its statistics must not move
    try:
        layers = conv_bn_act_layers(model, *inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    taken = []  # (layer, its Sequential's name, position, ConvBNAct, wanted)
    for layer in layers:
        parent = layer.name.rpartition(".")[0]
        if not parent:
            raise ValueError("the model is itself the nn.Sequential to fuse: wrap it in a "
                             "module that holds it")
        conv = model.get_submodule(layer.name)
        children = list(model.get_submodule(parent))
        position = next(i for i, child in enumerate(children) if child is conv)
        bn = children[position + 1]
        try:
            fused = ConvBNAct.from_modules(conv, bn, layer.slope, impl=impl)
        except ValueError:  # a convolution or BatchNorm the op does not take
            continue
        taken.append((layer, parent, position, fused.train(was_training),
                      wanted(conv, bn, layer.slope, seen[conv])))
    wants = [item[4] for item in taken]
    chained: dict[str, set[int]] = {}  # the Sequential's name → its chained positions
    runs = [[0]] if taken else []
    for k in range(1, len(taken)):
        if taken[k][0].follows == taken[k - 1][0].name:
            runs[-1].append(k)
        else:
            runs.append([k])
    for run in (run for run in runs if chain is not None and len(run) > 1):
        (_, parent, first, *_), (last_layer, _, last, *_) = taken[run[0]], taken[run[-1]]
        block = list(model.get_submodule(parent))[first:last + _span(last_layer.slope)]
        module = FusedSequential(*block, fused={taken[k][2] - first: taken[k][3] for k in run})
        if chain(module.train(was_training), [wants[k] for k in run],
                 seen[taken[run[0]][3].conv]):
            for k in run:
                wants[k] = True
            chained.setdefault(parent, set()).update(taken[k][2] for k in run[:-1])
    chosen: dict[str, dict[int, ConvBNAct]] = {}  # the Sequential's name → its fused layers
    names = []
    for (layer, parent, position, fused, _), want in zip(taken, wants, strict=True):
        if want:
            chosen.setdefault(parent, {})[position] = fused
            names.append(layer.name)
    for name, fused in chosen.items():
        block = model.get_submodule(name)
        owner, _, attribute = name.rpartition(".")
        earlier = block if isinstance(block, FusedSequential) else FusedSequential()
        replacement = FusedSequential(OrderedDict(block.named_children()),
                                      fused={**earlier.fused, **fused},
                                      chained=earlier.chained | chained.get(name, set()))
        replacement.train(block.training)
        model.get_submodule(owner).register_module(attribute, replacement)
    return names


def _measure_layer(conv: nn.Module, bn: nn.Module, slope: float | None, x: torch.Tensor,
                   timer: Timer | None) -> dict:
    """The layer's dispatch entry for a training step on inputs like x (``measure_dispatch``:
    recorded, or measured once); ValueError for a layer the kernels do not take."""
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    # Outside autocast: cuDNN must run in x's dtype, as the Triton GEMM does.
    with torch.autocast(x.device.type, enabled=False):
        return measure_dispatch(
            x.detach(), conv.weight.detach().to(x.dtype), bias, bn.weight.detach(),
            bn.bias.detach(), bn.running_mean, bn.running_var,
            kind="conv_transpose" if isinstance(conv, nn.ConvTranspose2d) else "conv",
            stride=conv.stride[0], padding=conv.padding[0], slope=slope, training=True,
            momentum=bn.momentum, eps=bn.eps, timer=timer)


def triton_wins(conv: nn.Module, bn: nn.Module, slope: float | None, x: torch.Tensor) -> bool:
    """Whether the fused op, in its fastest measured form, beats cuDNN with Inductor's
    BatchNorm/LeakyReLU on this layer's training step in CUDA-graph replay; a ``wanted`` for
    ``fuse_conv_bn_act`` (``choose_fused_layers`` with mode "auto" is this, with the
    evidence)."""
    try:
        return _measure_layer(conv, bn, slope, x, None)["winner"] != "unfused"
    except ValueError:  # a layer the kernels do not take
        return False


def _chain_candidates(run: FusedSequential, plan: list[bool], x: torch.Tensor) -> dict:
    """{"layers": the run's training forward and backward with each layer fused as ``plan``
    says and none chained (the reference), "chained": every layer fused and chained}, each
    step returning (y, dx, the parameters' gradients) for a fixed output gradient. Each step
    runs a copy of the run's modules: measuring moves none of the model's statistics. On a
    GPU each is compiled, as the compiled step runs it: Inductor fuses an unfused layer's
    BatchNorm and activation around cuDNN's convolution."""
    positions = sorted(run.fused)
    params = next(run.parameters())
    # As the training step runs: under autocast where the input's dtype is not the weights'.
    autocast = torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != params.dtype)
    with torch.no_grad(), autocast:
        shape = copy.deepcopy(run).eval()(x).shape
    seed = torch.Generator(x.device).manual_seed(0)
    grad_y = torch.randn(shape, generator=seed, device=x.device).to(x.dtype)

    def candidate(fuse: list[bool], chained: bool):
        own = copy.deepcopy(run)
        module = FusedSequential(
            OrderedDict(own.named_children()),
            fused={p: own.fused[p] for p, f in zip(positions, fuse, strict=True) if f},
            chained=positions[:-1] if chained else ()).train()
        forward = compiled_for_timing(module) if x.is_cuda else module
        x_leaf = x.detach().requires_grad_()
        leaves = [x_leaf, *module.parameters()]

        def step():
            with torch.enable_grad(), autocast:
                y = forward(x_leaf)
            return (y.detach(), *torch.autograd.grad(y, leaves, grad_y))
        return step

    return {"layers": candidate(plan, False), "chained": candidate([True] * len(plan), True)}


def _measure_chain(run: FusedSequential, plan: list[bool], x: torch.Tensor,
                   layer_keys: list[str], timer: Timer | None) -> dict:
    """The run's dispatch entry (``dispatch.measured_choice``, keyed by its layers' own keys
    and slopes and by ``plan``: recorded, or measured once), with its key under "key"."""
    layers = [run.fused[p] for p in sorted(run.fused)]
    # A layer's key: device, versions, then its own fields, "train fwd+bwd", "in-graph".
    fields = [" ".join(["[" + " | ".join(k.split(" | ")[3:-2]) + "]", f"slope {layer.slope}",
                        f"bias {layer.conv.bias is not None}"])
              for k, layer in zip(layer_keys, layers, strict=True)]
    key = dispatch.key(x.device, "conv_bn_act chain", *fields, f"impl {layers[0].impl}",
                       "unchained " + ",".join("fused" if f else "unfused" for f in plan),
                       "train fwd+bwd", "in-graph")
    entry = dispatch.measured_choice(
        key, lambda: _chain_candidates(run, plan, x), reference="layers",
        tolerance=parity_tolerance(x),
        timer=timer if timer is not None else dispatch.graph_replay_ms)
    return {"key": key, **entry}


FUSED_LAYER_MODES = ("auto", "on", "off")


def choose_fused_layers(model: nn.Module, *inputs: torch.Tensor, mode: str,
                        timer: Timer | None = None) -> tuple[list[str], dict]:
    """Fuses ``model``'s conv → BatchNorm2d (→ activation) layers in place per ``mode`` and
    returns (the fused convolutions' names, the evidence). ``inputs``: what the training
    step gives ``model`` (under the step's autocast, if any: each layer is measured with the
    dtype and layout its input has there).

    - "auto": each layer the op takes is measured (``measure_dispatch``: its training
      forward and backward at this shape, every candidate — cuDNN with Inductor's BatchNorm
      and LeakyReLU ("unfused"), the fused BatchNorm kernels after cuDNN, each Triton tiling,
      split-K ones included — timed inside CUDA-graph replay, medians, cached per card,
      versions, shape, dtype and layout; a miss measures once), and fused exactly where a
      fused candidate beats "unfused";
    - "on": every layer the op takes is fused (measured as for "auto" where timing can run,
      so the op uses its fastest form);
    - "off": nothing is fused or measured.

    Chains: each run of two or more layers the op takes, each reading the previous one's
    activation (a residual block's body), is measured as a whole for "auto" and "on": its
    training forward and backward, timed like the layers, with each layer fused as decided
    alone ("layers") against every layer fused and chained through the next one's prologue
    ("chained", ``FusedSequential.chained``: no normalised activation written but the
    last's); the run is chained where "chained" wins, its layers then all fused. "on"
    unmeasured chains every run.

    Fused layers run ``impl="auto"``: the fastest fused candidate of the layer's entry.
    Timing needs CUDA graphs: on a model not on a GPU and without ``timer`` (tests inject
    one), "auto" fuses nothing and says why under "refused"; "on" fuses unmeasured.

    The evidence, JSON-serialisable: {"mode", "layers": {name: {"key", "winner", "ms"
    ({candidate: median ms}), "impl" (the fused op's choice), "fused", ...}}}, plus "refused"
    or "unmeasured" (why nothing was timed), and per layer "refused" where the op does not
    take it; "chains": [{"layers": [names], "chained", and when measured "key", "winner",
    "ms", ...}], each chained layer marked "chained" in "layers".
    """
    if mode not in FUSED_LAYER_MODES:
        raise ValueError(f"mode must be one of {FUSED_LAYER_MODES}, got {mode!r}")
    evidence: dict = {"mode": mode, "layers": {}}
    if mode == "off":
        return [], evidence
    names_of = {module: name for name, module in model.named_modules()}
    on_gpu = any(p.is_cuda for p in model.parameters())
    if timer is None and not on_gpu:
        reason = ("timing in CUDA-graph replay needs CUDA: the model is not on a GPU and no "
                  "timer was given")
        if mode == "auto":
            evidence["refused"] = reason + "; no layer is fused"
            return [], evidence
        evidence["unmeasured"] = reason

    def wanted(conv: nn.Module, bn: nn.Module, slope: float | None, x: torch.Tensor) -> bool:
        layer: dict = {}
        evidence["layers"][names_of[conv]] = layer
        if "unmeasured" in evidence:
            layer["fused"] = True
            return True
        try:
            layer.update(_measure_layer(conv, bn, slope, x, timer))
        except ValueError as exc:  # a layer the kernels do not take
            layer.update(fused=False, refused=str(exc))
            return False
        layer["fused"] = mode == "on" or layer["winner"] != "unfused"
        return layer["fused"]

    def chain(run: FusedSequential, plan: list[bool], x: torch.Tensor) -> bool:
        names = [names_of[run.fused[p].conv] for p in sorted(run.fused)]
        record: dict = {"layers": names}
        evidence.setdefault("chains", []).append(record)
        refused = [name for name in names if "refused" in evidence["layers"][name]]
        if refused:
            record.update(chained=False, refused=f"the op does not take {', '.join(refused)}")
            return False
        if "unmeasured" not in evidence:
            record.update(_measure_chain(run, plan, x,
                                         [evidence["layers"][name]["key"] for name in names],
                                         timer))
        record["chained"] = "winner" not in record or record["winner"] == "chained"
        for name in names if record["chained"] else ():
            evidence["layers"][name].update(fused=True, chained=True)
        return record["chained"]

    return (fuse_conv_bn_act(model, *inputs, impl="auto", wanted=wanted, chain=chain),
            evidence)
