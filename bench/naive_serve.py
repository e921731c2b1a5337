#!/usr/bin/env python
"""The naive reference server of ``bench/serve.py``: what one would write in an afternoon.

FastAPI, a pydantic model of the request (one model per event, built from
the bundle's branch types), a plain ``def`` route (so FastAPI runs it in its
threadpool), and one ``InferenceSession.run`` per request, with no batching
across requests. Preprocessing is the bundle's own (``Bundle.predict_events``:
events to arrays, derived names, cut, padding, then the ONNX call), so the
comparison with ``mlaas serve`` measures the serving machinery, not a
different feature computation.

Same route and body as ``mlaas serve``: ``POST /api/models/{name}/predict``
with a JSON list of events, answering ``{"model", "version", "outputs"}``.

Usage (bench/serve.py starts it)::

    .venv/bin/python bench/naive_serve.py --bundle DIR --port 8001
"""

# no ``from __future__ import annotations``: FastAPI must see the local Event class itself
import argparse
import math
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, create_model

from mlaas.bundle import Bundle
from mlaas.errors import DataError


def event_model(bundle: Bundle) -> type[BaseModel]:
    """A pydantic model of one event: a float per flat branch, a list of floats per jagged one."""
    fields: dict[str, Any] = {}
    for name, t in bundle.branch_types.items():
        fields[name] = (list[float], ...) if t.get("kind") == "jagged" else (float, ...)
    return create_model("Event", **fields)


def create_app(bundle_dir: str, name: str = "model") -> FastAPI:
    bundle = Bundle.load(bundle_dir)
    Event = event_model(bundle)
    app = FastAPI(title="naive reference server")

    def predict(model: str, events: list[Event]) -> dict[str, Any]:  # type: ignore[valid-type]
        if model != name:
            raise HTTPException(404, f"no model {model!r}")
        try:
            scores = bundle.predict_events([e.model_dump() for e in events])
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        outputs = [None if math.isnan(row[0]) else row[0] for row in scores.tolist()]
        return {"model": name, "version": 1, "outputs": outputs}

    app.add_api_route("/api/models/{model}/predict", predict, methods=["POST"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--name", default="model", help="model name in the route")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.bundle, args.name), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
