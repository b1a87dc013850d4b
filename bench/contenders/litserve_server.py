"""LitServe with dynamic batching (max 32 samples, 5 ms timeout), one inference worker per model.

Each model is its own `LitAPI` on `/predict/<name>`, taking the same `{"inputs": [sample]}` body as
bnserve; LitServe stacks the decoded samples, runs one forward under `torch.inference_mode()`
and answers each request with its own row. One API server process, so it meets the same client
load through one uvicorn, like the other contenders. Needs the optional `bench` dependency group.

    python -m bench.contenders.litserve_server --port 8003 --models-file models.json
"""

from __future__ import annotations

from typing import Any

import litserve as ls
import torch

from bench.contenders.common import UVICORN_OPTIONS, ModelSpec, build_module, parse_args, read_specs

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.005


class ModelAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(
            max_batch_size=MAX_BATCH_SIZE,
            batch_timeout=BATCH_TIMEOUT_S,
            api_path=f"/predict/{spec.name}",
        )
        self.model_spec = spec

    def setup(self, device: str) -> None:
        self.module = build_module(self.model_spec)

    # No annotations on `request` and the return of `encode_response`: LitServe reads them as the
    # endpoint's types, and unannotated means its default (the parsed JSON body, a JSON response).
    def decode_request(self, request, **kwargs: Any) -> torch.Tensor:
        # One sample per request, sent as a batch of one: LitServe's `batch` stacks the samples.
        return torch.tensor(request["inputs"], dtype=torch.float32)[0]

    def predict(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.module(x)
        return out

    def encode_response(self, output: torch.Tensor, **kwargs: Any):
        return {"outputs": [output.tolist()]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    apis = [ModelAPI(spec) for spec in read_specs(args.models_file)]
    server = ls.LitServer(apis, accelerator="cpu", devices=1, workers_per_device=1)
    options = {k: v for k, v in UVICORN_OPTIONS.items() if k != "timeout_graceful_shutdown"}
    server.run(
        port=args.port,
        num_api_servers=1,
        generate_client_file=False,
        **options,
    )


if __name__ == "__main__":
    main()
