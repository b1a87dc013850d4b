"""The in-process limit in a process of its own: `POST /measure` times forward passes alone.

It runs in its own session like every server, so the scheduler (autogroups, on Linux) treats it
as it treats them, and it is paused with them; the HTTP around it only carries the order and the
result. The forwards themselves are `bench.limit.measure`: bnserve's own `build_loaded` module.

    python -m bench.contenders.limit_server --port 8004 --models-file models.json
"""

from __future__ import annotations

from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from bench import limit
from bench.contenders.common import UVICORN_OPTIONS, parse_args, read_specs
from service.serving.allocator import tune_allocator
from service.serving.loaded import LoadedModel
from service.settings import Settings


class MeasureBody(BaseModel):
    model: str
    batch: int = Field(ge=1)
    seconds: float = Field(gt=0)


def create_app(loaded: dict[str, LoadedModel]) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/measure")
    def measure(body: MeasureBody) -> dict[str, Any]:
        model = loaded.get(body.model)
        if model is None:
            raise HTTPException(404, f"unknown model {body.model!r}")
        result: dict[str, Any] = limit.measure(model, body.batch, body.seconds)
        result["torch_threads"] = torch.get_num_threads()
        return result

    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if Settings().MALLOC_TUNING:
        tune_allocator()  # the allocator bnserve runs with, so the limit bounds the same thing
    loaded = {
        spec.name: limit.load(
            spec.name,
            spec.architecture,
            spec.config,
            torch.load(spec.weights, weights_only=True, map_location="cpu"),
        )
        for spec in read_specs(args.models_file)
    }
    uvicorn.run(create_app(loaded), port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
