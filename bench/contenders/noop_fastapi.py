"""The floor of per-request cost: a FastAPI endpoint that reads the same body and does nothing.

An `async def` route that awaits the whole body (so the bytes cross the same HTTP parser) and
returns a small constant JSON object; no model, no thread hop. Whatever bnserve spends above this
is its own machinery plus its forward pass.

    python -m bench.contenders.noop_fastapi --port 8002 --models-file models.json
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI, Request

from bench.contenders.common import UVICORN_OPTIONS, parse_args


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict/{name}")
    async def predict(name: str, request: Request) -> dict[str, list[list[float]]]:
        await request.body()
        return {"outputs": [[0.0, 0.0]]}

    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])  # --models-file is accepted and not needed
    uvicorn.run(create_app(), port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
