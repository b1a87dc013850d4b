"""A version ready to serve: its module built, filled, on the device, in eval mode, gated, then
optimized for serving (`optimize.py`) and gated again."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models import ArchConfig, Architecture
from service.preprocess.pipeline import ImagePipeline, Preprocess
from service.serving.drift import DriftProbe
from service.serving.gate import run_gate
from service.serving.optimize import OptimizationReport, OptimizeOptions, optimize

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    name: str
    version: int
    sha256: str
    architecture: Architecture
    config: ArchConfig
    module: nn.Module
    device: torch.device
    input_shape: tuple[int, ...]
    task: str
    labels: list[str] | None
    # The model's image pipeline (fixed for its life), or None: it takes tensors only.
    image_pipeline: ImagePipeline | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    optimizations: OptimizationReport = field(default_factory=OptimizationReport)
    # The model's id: names are reused after a delete, ids never (`registry.Identity`).
    model_id: str = ""
    # The plain module's first BN layers, for the input-drift alarm; None when it is off.
    probe: DriftProbe | None = None

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of the module's parameters and buffers (each storage once), for the metrics."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values()) + (self.probe.nbytes if self.probe is not None else 0)

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass; BN uses its running statistics, so rows are independent."""
        with torch.inference_mode():
            out: torch.Tensor = self.module(x.to(self.device, non_blocking=True))
            return out.float().cpu()


def build_loaded(
    *,
    name: str,
    version: int,
    sha256: str,
    architecture: Architecture,
    config: ArchConfig,
    state_dict: dict[str, torch.Tensor],
    device: torch.device,
    options: OptimizeOptions | None = None,
    preprocess: dict[str, Any] | None = None,
    model_id: str = "",
) -> LoadedModel:
    """Build, fill (strict), move, switch to eval, gate, optimize; blocking, so call from a thread.

    The plain module is kept only for the optimizations' check and, with `drift_layers`, to
    cut the drift probe from; the LoadedModel holds the optimized one (or the plain one, where
    nothing could be applied) and the probe.
    """
    module = architecture.build(config)
    module.load_state_dict(state_dict, strict=True)
    module.to(device)
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    input_shape = tuple(config.input_shape())
    run_gate(module, input_shape, device)
    served, report = optimize(module, input_shape, device, options)
    probe = _drift_probe(name, module, input_shape, device, options)
    del module
    which = f"version {version}" if version else "a new version"
    log.info("loaded %s %s for serving: %s", name, which, report.summary())
    return LoadedModel(
        name=name,
        version=version,
        sha256=sha256,
        architecture=architecture,
        config=config,
        module=served,
        device=device,
        input_shape=input_shape,
        task=config.task,
        labels=config.labels(),
        image_pipeline=Preprocess.model_validate(preprocess).image if preprocess else None,
        optimizations=report,
        model_id=model_id,
        probe=probe,
    )


def _drift_probe(
    name: str,
    plain: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    options: OptimizeOptions | None,
) -> DriftProbe | None:
    """The drift probe when asked for; a probe that cannot be built never fails the load."""
    if options is None or options.drift_layers <= 0:
        return None
    try:
        probe = DriftProbe.build(plain, input_shape, device, layers=options.drift_layers)
    except Exception as exc:
        log.warning("%s: no input-drift probe (%s: %s)", name, type(exc).__name__, exc)
        return None
    if probe is None:
        log.info("%s has no BatchNorm with running statistics: no input drift measured", name)
    return probe
