"""The architectures this server can build (built-in and operator plugins)."""

from __future__ import annotations

from fastapi import APIRouter

from models import list_architectures
from service.api.deps import ReadAuth
from service.api.schemas import ArchitecturePublic

router = APIRouter(prefix="/v1/architectures", tags=["architectures"], dependencies=[ReadAuth])


@router.get("")
async def list_all() -> list[ArchitecturePublic]:
    out = []
    for arch in list_architectures():
        config = arch.default_config()
        out.append(
            ArchitecturePublic(
                name=arch.name,
                description=arch.description,
                input_shape=list(config.input_shape()),
                task=config.task,
                config_schema=arch.config_schema(),
                default_config=config.model_dump(mode="json"),
            )
        )
    return out
