"""Folding eval-mode BatchNorms into the Conv/Linear before them.

In eval mode a BatchNorm is a fixed per-channel scale and shift, so `bn(conv(x))` equals one
conv with rescaled weights and a shifted bias (PyTorch's own formulas,
`torch.nn.utils.fusion.fuse_conv_bn_weights` / `fuse_linear_bn_weights`).

Which BN follows which layer is found by recording one forward pass, not by torch.fx: fx's
symbolic tracing patches `torch.nn.Module.__call__` for the whole process while it traces, so
every other version's forward running meanwhile failed ("module is not installed as a
submodule": 500s in `tests/test_swap.py` under load). The recording uses per-instance hooks on
the copy being folded and a `TorchFunctionMode`, which is thread-local. It finds what
`torch.fx.experimental.optimization.fuse` finds (a BN whose input is the output of a Conv of the
same rank, or of a Linear on (N, C) inputs, that nothing else uses) and refuses what fx cannot
trace: a forward that reads tensor values into Python (data-dependent control flow), since another
input could take another path. The folded module keeps its own class, each folded BN replaced by
`nn.Identity`, so nothing of the analysis stays alive with it.

It does not see a layer's weight used outside that layer (weight tying by hand); the probe check
in `optimize.py` catches what that would break.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

Layer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear

FOLDS_INTO: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Tensor -> Python value conversions: what control flow on tensor values needs.
_VALUE_READS = frozenset(
    {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "__array__"}
)


class NotFoldable(Exception):
    """The module's forward cannot be analysed safely; the message says why."""


def fold_batchnorm(plain: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of eval-mode `plain` with its BatchNorms folded, and how many were folded.

    `example` is one input batch for the recorded forward. Raises NotFoldable when the forward
    reads tensor values into Python. `plain` is left untouched.
    """
    folded = copy.deepcopy(plain)  # its own tensors: plain stays intact for the check
    pairs = _Recording(folded).pairs(example)
    modules = dict(folded.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        assert isinstance(layer, _PRODUCERS)
        assert isinstance(bn, _BatchNorm)
        _fold_into(layer, bn)
        folded.set_submodule(bn_name, nn.Identity())
    return folded.eval().requires_grad_(False), len(pairs)


def count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


class _Recording(TorchFunctionMode):
    """One forward pass of `module`, recording which layer's output each BN gets and how often
    anything else uses a tensor (torch calls outside BN forwards, and the model's output)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.uses: Counter[int] = Counter()
        self.calls: Counter[str] = Counter()
        self.produced_by: dict[int, str] = {}
        self.bn_input: dict[str, int] = {}
        self.bn_inputs: Counter[int] = Counter()
        self.alive: list[torch.Tensor] = []  # so that no id is reused during the recording
        self.muted = 0  # > 0 inside a BN's forward (its own use of its input) and in hooks
        self.value_read: str | None = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _VALUE_READS and self.value_read is None:
            self.value_read = name
        if not self.muted:
            self._use(tree_flatten((args, kwargs))[0])
        return func(*args, **kwargs)

    def pairs(self, example: torch.Tensor) -> list[tuple[str, str]]:
        """(layer, bn) qualified names of every pair that can be folded."""
        paths = Counter(id(m) for _, m in self.module.named_modules(remove_duplicate=False))
        candidates = {
            name: m
            for name, m in self.module.named_modules()
            if paths[id(m)] == 1  # a module reachable by two names could be called by either
            and (isinstance(m, _PRODUCERS) or type(m) in FOLDS_INTO)
        }
        handles = []
        for name, m in candidates.items():
            if isinstance(m, _PRODUCERS):
                handles.append(m.register_forward_hook(self._produced(name)))
            else:
                handles.append(m.register_forward_pre_hook(self._bn_enters(name)))
                handles.append(m.register_forward_hook(self._bn_leaves))
        try:
            with torch.inference_mode(), self:
                out = self.module(example)
            self._use(tree_flatten(out)[0])
        finally:
            for handle in handles:
                handle.remove()
        if self.value_read is not None:
            raise NotFoldable(
                f"the forward reads tensor values into Python ({self.value_read}), so its path "
                "may depend on the input"
            )
        found = []
        for bn_name, tensor_id in self.bn_input.items():
            layer_name = self.produced_by.get(tensor_id)
            if layer_name is None or self.calls[bn_name] != 1 or self.calls[layer_name] != 1:
                continue
            if self.uses[tensor_id] or self.bn_inputs[tensor_id] != 1:
                continue  # the layer's output is used elsewhere too
            layer, bn = candidates[layer_name], candidates[bn_name]
            if _compatible(layer, bn):
                found.append((layer_name, bn_name))
        return found

    def _use(self, values: list[Any]) -> None:
        for value in values:
            if isinstance(value, torch.Tensor):
                self.uses[id(value)] += 1
                self.alive.append(value)

    def _produced(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.calls[name] += 1
            # Linear->BatchNorm1d folds per output feature: right only when those are dim 1.
            if not isinstance(out, torch.Tensor):
                return
            self.muted += 1  # reading the rank is this hook's doing, not a use by the model
            rank = out.dim()
            self.muted -= 1
            if not isinstance(module, nn.Linear) or rank == 2:
                self.produced_by[id(out)] = name
                self.alive.append(out)

        return hook

    def _bn_enters(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.calls[name] += 1
            self.muted += 1
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                self.bn_input[name] = id(args[0])
                self.bn_inputs[id(args[0])] += 1
                self.alive.append(args[0])

        return hook

    def _bn_leaves(self, module: nn.Module, args: Any, out: Any) -> None:
        self.muted -= 1


def _compatible(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BatchNorm) or type(layer) not in FOLDS_INTO.get(type(bn), ()):
        return False
    if bn.training or layer.training:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False  # track_running_stats=False: batch statistics, nothing fixed to fold
    if isinstance(layer, nn.Linear):
        return bool(layer.out_features == bn.num_features)
    assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    return bool(layer.out_channels == bn.num_features)


def _fold_into(layer: Layer, bn: _BatchNorm) -> None:
    """Give `layer` the weights of layer-then-BN in eval mode (PyTorch's own fusion formulas)."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None
    assert var is not None
    # bn_affine=False has no weight or bias: the identity scale and shift.
    gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
    if isinstance(layer, nn.Linear):
        weight, bias = fuse_linear_bn_weights(
            layer.weight, layer.bias, mean, var, bn.eps, gamma, beta
        )
    else:
        weight, bias = fuse_conv_bn_weights(
            layer.weight, layer.bias, mean, var, bn.eps, gamma, beta
        )
    layer.weight, layer.bias = weight, bias
