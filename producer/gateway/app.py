"""``tierq gateway``: authenticated, OpenAI-compatible HTTP in front of the priority topics.

Bearer API key -> tenant; priority from ``X-Priority`` or the body's ``priority`` (capped
by the tenant's maximum); the tenant's quotas are charged here; the request goes to its
pool's band topic and the handler waits for the reply on the tenant's reply topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import orjson
import prometheus_client
import structlog
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from prometheus_client import Counter, Histogram

from broker.topics import create_topics
from producer.batchfile import from_openai_body
from producer.client import DeliveryError
from producer.gateway.api_models import (
    BatchCreateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    validation_message,
)
from producer.gateway.batches import BatchError, BatchService
from producer.gateway.bridge import KafkaBridge
from producer.gateway.openai_api import ApiError, api_error_for, completion_body, reply_error, stream_chunks
from producer.gateway.settings import GatewaySettings
from producer.gateway.streaming import ChunkFormat, StreamDiverged, TextStream, error_event
from producer.quota import QuotaExceeded
from schemas.codec import MessageError
from schemas.messages import Band, Chunk, ErrorCode, Reply, Request as TierqRequest, utc_now
from schemas.tenants import ApiKeys, TenantsReloader
from schemas.topology import Topology

log = structlog.get_logger("tierq.gateway")

REQUESTS = Counter("tierq_gateway_requests", "HTTP requests answered", ["endpoint", "tenant", "status"])
LATENCY = Histogram("tierq_gateway_request_seconds", "time to answer a completion request", ["endpoint"],
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
QUOTA_REJECTIONS = Counter("tierq_gateway_quota_rejections", "requests refused with 429", ["tenant"])

#: Accepted in an OpenAI body by the HTTP API besides the generation fields.
HTTP_EXTRA_FIELDS = frozenset({"stream_options"})


class Gateway:
    """The state behind the routes: topology, keys, Kafka bridge, batches."""

    def __init__(self, settings: GatewaySettings, topology: Topology):
        self.settings = settings
        self.topology = topology
        self.keys = ApiKeys(topology)
        self.bridge = KafkaBridge(settings, topology)
        self.batches = BatchService(settings.batch_dir, self.bridge, settings.gateway_batch_priority,
                                    settings.gateway_model_name)
        self.reloader = TenantsReloader(settings.topics_file, settings.tenants_file,
                                        on_error=lambda p: log.error("tenants_reload_failed", problem=p))
        self._reload_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def cancel_in_background(self, request_id: str, tenant_id: str, reason: str) -> None:
        """Cancel a request nobody waits for any more (the client hung up): no GPU time for it."""
        async def cancel() -> None:
            try:
                await self.bridge.cancel(request_id, tenant_id, reason)
                log.info("request_cancelled", request_id=request_id, tenant=tenant_id, reason=reason)
            except (DeliveryError, MessageError) as exc:
                log.warning("cancel_not_published", request_id=request_id, tenant=tenant_id, error=str(exc))

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self) -> None:
        await asyncio.to_thread(create_topics, self.settings, self.topology)
        await self.bridge.start()
        self.batches.resume_open()
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_tenants())
        log.info("gateway_started", tenants=sorted(self.topology.tenants), keys=len(self.keys))

    async def stop(self) -> None:
        if self._reload_task is not None:
            self._reload_task.cancel()
        await self.bridge.stop()

    async def _reload_tenants(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            topology = self.reloader.reload(self.topology)
            if topology is None:
                continue
            new_topics = set(topology.tenants) - set(self.topology.tenants)
            if new_topics:
                await asyncio.to_thread(create_topics, self.settings, topology)
            self.topology = topology
            self.keys = ApiKeys(topology)
            self.bridge.update_topology(topology)
            log.info("tenants_reloaded", tenants=sorted(topology.tenants), keys=len(self.keys))

    # ---- helpers used by the routes --------------------------------------------------

    def authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'")
        tenant = self.keys.tenant_for(key.strip())
        if tenant is None:
            raise ApiError(401, "invalid_api_key", "invalid API key")
        return tenant

    def timeout_for(self, request: Request) -> float:
        raw = request.headers.get("x-request-timeout")
        if raw is None:
            return self.settings.gateway_timeout_s
        try:
            value = float(raw)
        except ValueError:
            raise ApiError(400, "invalid_request", f"X-Request-Timeout: {raw!r} is not a number of seconds") from None
        if not 0 < value <= self.settings.gateway_max_timeout_s:
            raise ApiError(400, "invalid_request",
                           f"X-Request-Timeout: must be in (0, {self.settings.gateway_max_timeout_s:g}] seconds")
        return value

    def default_priority(self, tenant_id: str) -> Band:
        cap = self.topology.tenants[tenant_id].max_priority
        wanted = self.settings.gateway_default_priority
        return wanted if wanted.rank >= cap.rank else cap


def create_app(settings: GatewaySettings, topology: Topology) -> FastAPI:
    gateway = Gateway(settings, topology)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="tierq gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        err = ApiError(400, "invalid_request", message, param=param)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, wrong method, unparseable multipart) in OpenAI's shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        err = ApiError(exc.status_code, code, str(exc.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)

    bearer = HTTPBearer(auto_error=False, description="the tenant's API key (tierq tenant add)")

    def authenticated(request: Request, _key: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The caller's tenant; a dependency, so a bad key is refused before the body is validated."""
        return gateway.authenticate(request)

    @app.exception_handler(BatchError)
    async def _batch_error(_request: Request, exc: BatchError) -> JSONResponse:
        err = ApiError(exc.status, "not_found" if exc.status == 404 else "invalid_request", exc.message)
        return JSONResponse(err.body(), status_code=err.status)

    async def completion(request: Request, url: str) -> Response:
        started = time.monotonic()
        tenant_id = gateway.authenticate(request)
        status = 500
        try:
            response = await _complete(gateway, request, url, tenant_id)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            if exc.status == 429:
                QUOTA_REJECTIONS.labels(tenant_id).inc()
            raise
        finally:
            REQUESTS.labels(url, tenant_id, str(status)).inc()
            LATENCY.labels(url).observe(time.monotonic() - started)

    # the typed bodies validate and document; _complete reads the raw body, which the request
    # contract checks in full (FastAPI keeps the bytes it parsed)
    @app.post("/v1/completions", dependencies=[Depends(authenticated)])
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await completion(request, "/v1/completions")

    @app.post("/v1/chat/completions", dependencies=[Depends(authenticated)])
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await completion(request, "/v1/chat/completions")

    @app.get("/v1/requests/{request_id}")
    async def get_request(request_id: str, request: Request) -> dict[str, Any]:
        tenant_id = gateway.authenticate(request)
        found = gateway.bridge.lookup(tenant_id, request_id)
        if found is None:  # unknown, or another tenant's: the same answer for both
            raise ApiError(404, "not_found", f"no request {request_id!r} for this API key")
        state, reply = found
        return {"request_id": request_id, "status": state,
                "reply": None if reply is None else reply.model_dump(mode="json", by_alias=True)}

    @app.post("/v1/requests/{request_id}/cancel")
    async def cancel_request(request_id: str, request: Request) -> JSONResponse:
        """Cancel one of the tenant's requests: queued, never started; running, aborted; either way
        its reply says ``cancelled``. Another tenant's request is not found (404); an id this gateway
        does not know is passed on to the workers, which honour it only for this tenant's request."""
        tenant_id = gateway.authenticate(request)
        known = gateway.bridge.owner(request_id)
        if known is not None and known != tenant_id:
            raise ApiError(404, "not_found", f"no request {request_id!r} for this API key")
        found = gateway.bridge.lookup(tenant_id, request_id)
        if found is not None and found[0] == "done":
            return JSONResponse({"id": request_id, "object": "request.cancel", "status": "already_finished"})
        try:
            await gateway.bridge.cancel(request_id, tenant_id, "cancelled through the API")
        except MessageError as exc:
            raise api_error_for(exc.code, exc.message) from None
        except DeliveryError as exc:
            raise ApiError(503, "broker_unavailable", f"the cancel was not accepted by Kafka: {exc}",
                           headers={"Retry-After": "5"}) from None
        return JSONResponse({"id": request_id, "object": "request.cancel", "status": "cancel_requested"},
                            status_code=202)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        tenant_id = gateway.authenticate(request)
        pool = gateway.topology.pools[gateway.topology.tenants[tenant_id].pool]
        return {"object": "list", "data": [{"id": pool.model or settings.gateway_model_name, "object": "model",
                                            "created": 0, "owned_by": "tierq"}]}

    # ---- batch API -------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
        tenant_id = gateway.authenticate(request)
        if purpose != "batch":
            raise ApiError(400, "invalid_request", f"purpose: {purpose!r} is not supported; use 'batch'")
        content = await file.read()
        meta = gateway.batches.save_file(tenant_id, file.filename or "upload.jsonl", purpose, content)
        return _public_file(meta)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request) -> dict[str, Any]:
        return _public_file(gateway.batches.file_meta(gateway.authenticate(request), file_id))

    @app.get("/v1/files/{file_id}/content")
    async def get_file_content(file_id: str, request: Request) -> Response:
        content = gateway.batches.file_content(gateway.authenticate(request), file_id)
        return Response(content, media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create_batch(body: BatchCreateRequest, tenant_id: str = Depends(authenticated)) -> dict[str, Any]:
        return gateway.batches.create(tenant_id, body.input_file_id, body.endpoint, body.completion_window,
                                      body.metadata)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return gateway.batches.get(gateway.authenticate(request), batch_id)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> dict[str, Any]:
        data = gateway.batches.list(gateway.authenticate(request))
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return gateway.batches.cancel(gateway.authenticate(request), batch_id)

    # ---- operations ------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, why = gateway.bridge.readiness()
        return JSONResponse({"status": "ready" if ready else "not_ready", "detail": why},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    return app


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body: expected a JSON object")
    return body


class ClientGone(Exception):
    """The HTTP client hung up before its answer was ready."""


async def _unless_hung_up(gateway: Gateway, request: Request, prepared: TierqRequest, waiting: Any) -> Any:
    """Await ``waiting`` (the reply, or a stream's first record) unless the client hangs up first:
    then the request is cancelled (nobody will read its answer) and ``ClientGone`` raised."""
    hang_up = asyncio.ensure_future(request.receive())  # the body was read: the next message is a disconnect
    work = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait({hang_up, work}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        answered = work.done()
        work.cancel()  # no-op when done; stops waiting when the client left or this handler is cancelled
    if answered:
        return work.result()
    gateway.cancel_in_background(prepared.request_id, prepared.tenant_id, "client disconnected")
    raise ClientGone()


async def _next_record(stream: asyncio.Queue[Chunk | Reply], timeout: float) -> Chunk | Reply | None:
    try:
        return await asyncio.wait_for(stream.get(), max(timeout, 0.0))
    except asyncio.TimeoutError:
        return None


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _stream_events(gateway: Gateway, prepared: TierqRequest, stream: asyncio.Queue[Chunk | Reply],
                         first: Chunk | Reply, fmt: ChunkFormat, deadline: float) -> AsyncIterator[bytes]:
    """Deltas as chunks arrive, then the reply's finish reason (and usage). Ending early (the client
    hung up, the deadline passed, the text diverged) cancels the request."""
    text, record, answered = TextStream(), first, False
    try:
        while True:
            try:
                new = text.chunk(record) if isinstance(record, Chunk) else text.reply(record)
            except StreamDiverged as exc:
                yield _sse(error_event("stream_diverged", f"{exc}; retry the request"))
                return
            if new:
                yield _sse(fmt.text(new))
            if isinstance(record, Reply):
                answered = True
                problem = reply_error(record)
                if problem is not None:
                    yield _sse(error_event(problem.code, problem.message))
                    return
                for chunk in fmt.finish(record):
                    yield _sse(chunk)
                yield b"data: [DONE]\n\n"
                return
            next_record = await _next_record(stream, deadline - time.monotonic())
            if next_record is None:
                yield _sse(error_event(ErrorCode.deadline_exceeded.value, "no reply before the request's deadline"))
                return
            record = next_record
    finally:
        gateway.bridge.close_stream(prepared.request_id)
        if not answered:
            gateway.cancel_in_background(prepared.request_id, prepared.tenant_id, "stream ended early")


async def _complete(gateway: Gateway, request: Request, url: str, tenant_id: str) -> Response:
    body = await _json_body(request)
    timeout = gateway.timeout_for(request)
    started = time.monotonic()
    try:
        doc = from_openai_body(url, body, extra_fields=HTTP_EXTRA_FIELDS)
    except MessageError as exc:
        raise ApiError(400, exc.code.value, exc.message) from None
    # tokens stream through Kafka for one output without logprobs; otherwise the reply is sent whole
    streamed = bool(body.get("stream")) and doc["params"].get("n", 1) == 1 and not doc["params"].get("logprobs")
    if streamed:
        doc["stream"] = True
    header_priority = request.headers.get("x-priority")
    asked = header_priority or doc.get("priority") or gateway.default_priority(tenant_id).value
    now = utc_now()
    doc.update(tenant_id=tenant_id, priority=asked, submitted_at=now, deadline=now + timedelta(seconds=timeout))
    try:
        prepared = gateway.bridge.prepare(doc)
    except QuotaExceeded as exc:
        raise api_error_for(exc.code, exc.message, retry_after=exc.retry_after) from None
    except MessageError as exc:
        raise api_error_for(exc.code, exc.message) from None
    headers = {"X-Tierq-Request-Id": prepared.request_id, "X-Tierq-Priority": prepared.priority.value}
    if prepared.priority.value != asked:
        headers["X-Tierq-Priority-Lowered"] = f"{asked}->{prepared.priority.value}"
    stream = gateway.bridge.open_stream(prepared.request_id) if streamed else None
    try:
        await gateway.bridge.publish(prepared)
    except MessageError as exc:  # e.g. over the message size limit
        gateway.bridge.close_stream(prepared.request_id)
        raise api_error_for(exc.code, exc.message) from None
    except DeliveryError as exc:
        gateway.bridge.close_stream(prepared.request_id)
        raise ApiError(503, "broker_unavailable", f"the request was not accepted by Kafka: {exc}",
                       headers={"Retry-After": "5"}) from None
    remaining = (prepared.deadline - utc_now()).total_seconds() if prepared.deadline else timeout
    try:
        if stream is not None:
            first = await _unless_hung_up(gateway, request, prepared, _next_record(stream, remaining))
        else:
            first = await _unless_hung_up(gateway, request, prepared,
                                          gateway.bridge.wait_reply(prepared.request_id, max(remaining, 0.0)))
    except ClientGone:
        gateway.bridge.close_stream(prepared.request_id)
        return Response(status_code=499)
    if first is None:
        gateway.bridge.close_stream(prepared.request_id)
        raise ApiError(504, ErrorCode.deadline_exceeded.value,
                       f"no reply within {timeout:g}s; it may still complete: GET /v1/requests/{prepared.request_id}",
                       headers=headers)
    problem = reply_error(first) if isinstance(first, Reply) else None
    if problem is not None:
        gateway.bridge.close_stream(prepared.request_id)
        problem.headers.update(headers)
        raise problem
    chat = url == "/v1/chat/completions"
    model = str(body.get("model") or gateway.settings.gateway_model_name)
    if stream is not None:
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        fmt = ChunkFormat(prepared.request_id, chat, model, include_usage=bool(options.get("include_usage")))
        return StreamingResponse(_stream_events(gateway, prepared, stream, first, fmt, started + timeout),
                                 media_type="text/event-stream", headers=headers)
    reply = first
    if body.get("stream"):
        chunks = stream_chunks(reply, chat, model)

        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
    return Response(orjson.dumps(completion_body(reply, chat, model)), media_type="application/json", headers=headers)


def _public_file(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "owner"}


def run_gateway(settings: GatewaySettings) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn handles the signals and drains connections)."""
    import uvicorn

    topology = settings.load_topology()
    settings.require_bootstrap()
    app = create_app(settings, topology)
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, log_level="info",
                access_log=False)
    return 0
