"""The app factory: ``create_app(settings)``; its lifespan starts and stops the runtime.

uvicorn app.main:create_app --factory     (settings from CTR_* environment variables)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from app import kserve
from app.bodylimit import BodyLimitMiddleware
from app.config import Settings
from app.control import SupervisorLink
from app.errors import ServiceError, error_response
from app.http import body_schema
from app.kserve import build_v2_router
from app.logs import configure
from app.metrics import Metrics, RequestMetricsMiddleware
from app.requestid import RequestIdMiddleware
from app.routes import build_router, prediction_docs, prediction_routes
from app.runtime import Runtime
from app.schemas import RequestSchemas
from app.v2schemas import InferSchema
from model.checkpoint import Prepared, load_checkpoint

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    prepared: Prepared | None = None,
    control: socket.socket | None = None,
) -> FastAPI:
    """Build the app. The checkpoint is read here, so /docs shows the model's real fields
    and a bad CTR_MODEL_DIR fails at once, with the loader's message.

    In a worker of several (``app.supervisor``): ``prepared`` is the checkpoint the
    supervisor verified, ``control`` the worker's end of its channel to it.
    """
    if settings is None:  # a server's factory (uvicorn --factory)
        settings = Settings.of_server()
        configure(settings.log_level)
    source = settings.model_dir if prepared is None else prepared
    checkpoint = load_checkpoint(source, tables=settings.tables_in_process)
    metrics = Metrics(multiprocess_dir=settings.metrics_dir if control is not None else None)

    # Handed to the runtime once, then forgotten here: the runtime keeps the model
    # built from it, not a second copy of every tensor.
    handover = [checkpoint]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        loaded = handover.pop() if handover else None
        runtime = await Runtime.start(settings, metrics, loaded)
        del loaded
        try:
            if control is None:
                with reload_on_sighup(runtime):
                    yield {"runtime": runtime}
            else:
                # Its own reload may wait for every worker to load, then to swap.
                link = SupervisorLink(control, 2 * settings.reload_timeout_s + 30)
                # Its supervisor gone, the worker stops as on SIGTERM (draining).
                await link.start(runtime, lambda: os.kill(os.getpid(), signal.SIGTERM))
                try:
                    yield {"runtime": runtime, "supervisor": link}
                finally:
                    await link.aclose()
        finally:
            closing = time.monotonic()
            await runtime.close()
            log.info("stopped: shutdown took %.2f s", time.monotonic() - closing)

    app = FastAPI(
        title="ctr-serve",
        summary="Click-through-rate predictions from a DeepFM",
        version=checkpoint.version,
        lifespan=lifespan,
    )
    router = build_router()
    app.include_router(router)
    v2 = build_v2_router()
    app.include_router(v2)
    served = prediction_routes()
    app.router.routes.extend(served)
    components: dict[str, Any] = {}
    docs = prediction_docs(
        RequestSchemas.build(checkpoint.features),
        settings.max_instances,
        components,
    )
    infer_body = body_schema(InferSchema.build(checkpoint.features).adapter, components)
    _document(app, docs, infer_body, components, settings)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        metrics.errors.labels(type(exc).__name__).inc()
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("InvalidRequest").inc()
        return JSONResponse({"detail": exc.errors()}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # A bug, never a client error: log it once, answer without internals.
        metrics.errors.labels("internal").inc()
        rid = getattr(request.state, "request_id", None)
        log.error("unexpected error on %s (request %s)", request.url.path, rid, exc_info=exc)
        response = error_response(ServiceError("internal error"), request.url.path)
        if rid is not None:  # (this handler answers outside every middleware)
            response.headers["x-request-id"] = rid
        return response

    routes = [*router.routes, *v2.routes, *served]
    endpoints = frozenset(route.path for route in routes)  # type: ignore[attr-defined]
    # The last added is the outermost: metrics see the 413s of the body limit too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, endpoints=endpoints)
    app.add_middleware(RequestIdMiddleware)  # (outermost: every answer carries the id)
    return app


def _document(
    app: FastAPI,
    docs: APIRouter,
    infer_body: dict[str, Any],
    components: dict[str, Any],
    settings: Settings,
) -> None:
    """The OpenAPI document: the app's FastAPI routes, the prediction routes' declarations
    (``docs``), the v2 inference body (``infer_body``) and the request bodies' schema
    definitions; with an API key set, the operations that need it say so (a security
    scheme)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=[*docs.routes, *app.routes],
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            kserve.document(schema, app.version, infer_body)
            if settings.api_key is not None:
                declare_api_key(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def declare_api_key(schema: dict[str, Any]) -> None:
    """Mark every operation that answers 401 as needing the X-API-Key header."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["ApiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{"ApiKey": []}]
                operation["parameters"] = [
                    p for p in operation.get("parameters", []) if p.get("name") != "X-API-Key"
                ]
                if not operation["parameters"]:
                    del operation["parameters"]


@contextmanager
def reload_on_sighup(runtime: Runtime) -> Iterator[None]:
    """SIGHUP reloads CTR_MODEL_DIR (as POST /admin/reload does) while the app runs.

    Where signals cannot be handled (not the main thread, not Unix) it does nothing.
    """
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        # A refused or failed reload is logged by the runtime; the old model serves on.
        with suppress(Exception):
            await runtime.reload()

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        # Not the default action (terminate) for a SIGHUP during shutdown: ignore it. A
        # reload under way is waited for by the runtime's close (and then refused).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
