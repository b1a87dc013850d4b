"""One path from a state_dict to a stored version, for uploads and trained weights alike.

`prepare` checks the tensors against the architecture, builds the canonical safetensors bytes
and loads and gates the result; only a version that passed all of that reaches `publish`, which
stores it as the model's next version. Nothing is written before the checks pass.

Both refer to the model by the id it was checked against: a model deleted and created again
under the same name while an upload streamed or a job trained gets nothing (404 or 409
`model_replaced`), never weights checked against another architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import get_architecture
from service.checkpoints.reader import read_state_dict
from service.checkpoints.validation import state_dict_to_safetensors, validate_state_dict
from service.db.tables import ModelRow, VersionRow
from service.registry import InTransaction, Registry
from service.serving.loaded import LoadedModel, build_loaded
from service.serving.optimize import OptimizeOptions


@dataclass
class Prepared:
    data: bytes
    report: dict[str, Any]
    loaded: LoadedModel


def prepare(
    model: ModelRow,
    state_dict: dict[str, torch.Tensor],
    device: torch.device,
    *,
    report_extra: dict[str, Any] | None = None,
    options: OptimizeOptions | None = None,
) -> Prepared:
    """Validate, canonicalize, load and gate a state_dict for `model` (blocking)."""
    arch = get_architecture(model.architecture)
    config = arch.parse_config(model.config)
    canonical, report = validate_state_dict(state_dict, arch.build(config))
    for key, value in (report_extra or {}).items():
        setattr(report, key, value)
    data = state_dict_to_safetensors(canonical)
    loaded = build_loaded(
        name=model.name,
        version=0,  # numbered when stored
        sha256="",
        architecture=arch,
        config=config,
        state_dict=canonical,
        device=device,
        options=options,
        preprocess=model.preprocess,
        model_id=model.id,
    )
    return Prepared(data=data, report=report.model_dump(mode="json"), loaded=loaded)


def prepare_upload(
    model: ModelRow,
    path: Path,
    filename: str,
    device: torch.device,
    options: OptimizeOptions | None = None,
    *,
    max_bytes: int,
) -> Prepared:
    """Read an uploaded file without running pickle code, then `prepare` it.

    `max_bytes` bounds what the checkpoint may inflate to (the upload limit).
    """
    state_dict, info = read_state_dict(path, filename, max_bytes=max_bytes)
    return prepare(
        model,
        state_dict,
        device,
        report_extra={"format": info.format, "unwrapped_from": info.unwrapped_from},
        options=options,
    )


def publish(
    registry: Registry,
    prepared: Prepared,
    *,
    source: str,
    note: str | None = None,
    lineage: dict[str, Any] | None = None,
    promote: bool = False,
    in_transaction: InTransaction | None = None,
) -> VersionRow:
    """Store a prepared version for the model it was checked against (see `add_version`); its
    LoadedModel then carries the new number."""
    row = registry.add_version(
        prepared.loaded.name,
        prepared.data,
        source=source,
        note=note,
        report=prepared.report,
        lineage=lineage,
        model_id=prepared.loaded.model_id,
        promote=promote,
        in_transaction=in_transaction,
    )
    prepared.loaded.version = row.version
    prepared.loaded.sha256 = row.sha256
    return row
