"""`blade serve`: KServe's ModelServer (v2 REST and gRPC, health, metrics) over blade artifacts, loaded in the
background so that liveness answers at once and inference answers 503 until a model is ready."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from blade.errors import InputError
from blade.serve.kserve_import import kserve
from blade.serve.model import ArtifactModel
from blade.serve.options import ServeOptions, checked_artifacts

log = logging.getLogger("blade.serve")


DRAIN_LIMIT = 256 << 20  # bytes of a refused body read before the 413, not to break the client's pipe


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive, int(length))
            return await self._refuse(send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise kserve.errors.InvalidInput(f"the request body is over the server's limit of {self.limit} "
                                                 "bytes (--max-request-mb); split the request")
            return message

        return await self.app(scope, counted, send)

    async def _drain(self, receive, length: int) -> None:
        """Read and drop the refused body (up to DRAIN_LIMIT bytes), so that a client still sending it reads the 413
        instead of a broken pipe; past the limit the connection just closes after the answer."""
        if length > DRAIN_LIMIT:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _refuse(self, send, length: int):
        body = json.dumps({"error": f"the request body is {length} bytes, over the server's limit of {self.limit} "
                                    "bytes (--max-request-mb); split the request"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve(artifacts, *, names: list[str] | None = None, http_port: int = 8080, grpc_port: int | None = 8081,
          options: ServeOptions | None = None, workers: int = 1, grace_period: int = 30, extra_models=()) -> int:
    """Serve the artifacts until SIGTERM/SIGINT (then drain in-flight requests); the exit status.

    `workers` is how many batches may run at once (model instances, as Triton's instance count); one suits a
    CPU whose cores the backend already uses. `extra_models` are further KServe models to host (the LLM one).
    """
    options = options or ServeOptions()
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blade-batch")
    models = [ArtifactModel(name, path, options, executor, concurrency=workers)
              for name, path in checked_artifacts(artifacts, names)]
    models += list(extra_models)
    kserve.model_server.args.grpc_max_receive_message_length = options.max_request_bytes
    kserve.model_server.args.grpc_max_send_message_length = max(options.max_request_bytes, 64 << 20)
    server = kserve.ModelServer(http_port=http_port, grpc_port=grpc_port or 0, enable_grpc=grpc_port is not None,
                                workers=1, grace_period=grace_period, enable_latency_logging=False)
    kserve.model_server.app.add_middleware(BodyLimit, limit=options.max_request_bytes)
    for model in models:
        server.register_model(model)
    language_models = [m for m in models if not isinstance(m, ArtifactModel)]
    if language_models:
        from blade.serve.completions import register_routes

        register_routes(kserve.model_server.app, language_models)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)  # a log line per request: too slow under load
    def load_all():
        for model in models:
            try:
                model.load()
                log.info("blade: model %s ready%s", model.name, "".join(f" ({n})" for n in
                                                                         getattr(model, "notes", [])))
            except Exception as exc:  # the server cannot do its job: say why and exit (a failed start, not a drain)
                log.error("blade: could not load model %s: %s", model.name, exc)
                print(f"blade: error: could not load model {model.name}: {exc}", file=sys.stderr, flush=True)
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=load_all, name="blade-load", daemon=True).start()
    server.start([])
    executor.shutdown(wait=True)
    return 0
