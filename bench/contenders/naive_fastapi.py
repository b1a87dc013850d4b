"""The naive server bnserve exists to beat: one forward pass per request, JSON in and out.

A sync route, so FastAPI runs it on its thread pool; the body is validated by a pydantic model and
turned into a tensor with `torch.tensor`, the forward runs under plain `torch.inference_mode()`.
No batching, no queue: what a first version of a model server usually looks like.

    python -m bench.contenders.naive_fastapi --port 8001 --models-file models.json
"""

from __future__ import annotations

from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.contenders.common import UVICORN_OPTIONS, build_module, parse_args, read_specs


class PredictBody(BaseModel):
    inputs: list[Any]


def create_app(modules: dict[str, torch.nn.Module]) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict/{name}")
    def predict(name: str, body: PredictBody) -> dict[str, Any]:
        module = modules.get(name)
        if module is None:
            raise HTTPException(404, f"unknown model {name!r}")
        x = torch.tensor(body.inputs, dtype=torch.float32)
        with torch.inference_mode():
            out = module(x)
        return {"outputs": out.tolist()}

    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    modules = {spec.name: build_module(spec) for spec in read_specs(args.models_file)}
    uvicorn.run(create_app(modules), port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
