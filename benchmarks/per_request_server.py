"""The peer baseline: a reward server built the way OpenRLHF's `serve_rm.py` is.

The model runs *inside* the async request handler (blocking the event loop) on exactly that
request's sequences: no cross-request batching, no queue, no fairness. Same GPM, same parsing
of OpenRLHF payloads (`gpm_server.routes_openrlhf`), same tokenisation; prefix sharing off (the
peer has none). Routes: `POST /get_reward` (alias `/openrlhf/reward`), `POST /score` (one
batch per request; answers embeddings and eigenvalues only), `GET /ready`.

    python -m benchmarks.per_request_server --model PATH --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI, Request


def create_app(model: Any) -> FastAPI:
    from gpm_server.routes_openrlhf import parse_items, special_tokens
    from gpm_server.schemas import OpenRLHFRewardRequest

    app = FastAPI()
    markers = special_tokens(model)

    async def reward(request: Request) -> dict[str, Any]:
        body = OpenRLHFRewardRequest.model_validate(await request.json())
        items = parse_items(body, markers)
        out = model.forward(model.encode([(it.messages, it.response) for it in items]))
        logs = {
            f"gpm_emb_{d}": out.embeddings[:, d].tolist() for d in range(out.embeddings.shape[1])
        }
        zeros = [0.0] * len(items)
        return {"rewards": zeros, "scores": zeros, "extra_logs": logs}

    app.post("/get_reward")(reward)
    app.post("/openrlhf/reward")(reward)

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await request.json()
        pairs = [(g["prompt"], r) for g in body["groups"] for r in g["responses"]]
        out = model.forward(model.encode(pairs))
        return {"embeddings": out.embeddings.tolist(), "eigenvalues": out.eigenvalues.tolist()}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from gpm_server.model import GPM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = GPM.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    model.prefix_sharing = False
    model.forward(model.encode([("Hello!", "Hi, how can I help?")]))  # warm up, like ours
    uvicorn.run(create_app(model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
