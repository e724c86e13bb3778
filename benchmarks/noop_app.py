"""The no-op floor of the serving benchmark: the same HTTP stack and the same request
validation as the real /predict (the checkpoint's compiled schema on the raw bytes),
then a constant answer instead of a model.

    uvicorn benchmarks.noop_app:create_app --factory
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.config import Settings
from app.http import json_body, json_response, validate
from app.schemas import RequestSchemas
from model.checkpoint import load_checkpoint


def create_app() -> FastAPI:
    settings = Settings()
    features = load_checkpoint(settings.model_dir).features
    schemas = RequestSchemas.build(features)
    version = "noop"
    app = FastAPI(title="ctr-serve no-op floor")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = validate(await json_body(request), schemas.predict)
        assert isinstance(body["features"], dict)
        return json_response({"probability": 0.5, "model_version": version})

    @app.get("/readyz")
    async def readyz() -> Response:
        return json_response({"status": "ready"})

    return app
