"""The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and the page at ``/``.

Security, in one place: with an API key (``LAV2_API_KEY``) every ``/v1`` request needs
``Authorization: Bearer <key>`` (compared in constant time); the page and ``/health`` stay open so
a browser can load the page and be asked for the key. Bodies over ``max_body_bytes`` are refused
before they are read whole (413), images over the pixel limits and any image that is not a data
URL are refused (400), and every failure is answered in OpenAI's error shape while the server
goes on. Generation happens on one worker thread (``worker``); the event loop only parses,
checks and streams; parsing a body and fitting its conversation to the context (tokenizing) run
on one thread of their own, so a large request never stalls ``/health`` or other streams.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from llama_adapter_v2.infer.chat import context_limit
from llama_adapter_v2.infer.generation import Completion
from llama_adapter_v2.infer.loading import LoadedModel
from llama_adapter_v2.registry.requests import ImageLimits
from llama_adapter_v2.serve.conversation import Defaults, FittedPrompt, chat_input, fitted_prompt
from llama_adapter_v2.serve.errors import APIError, install_handlers, validation_error
from llama_adapter_v2.serve.schema import ChatRequest
from llama_adapter_v2.serve.served import ModelCard
from llama_adapter_v2.serve.worker import GenerationQueue, QueueFullError, ShuttingDownError

API_KEY_VARIABLE = "LAV2_API_KEY"
MIB = 1024 * 1024
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    max_body_bytes: int = 20 * MIB
    image_limits: ImageLimits = field(
        default_factory=lambda: ImageLimits(max_bytes=20 * MIB, max_side=4096, max_pixels=4096 * 4096)
    )
    defaults: Defaults = field(default_factory=Defaults)
    max_batch: int = 8
    max_waiting: int = 64


def chat_page() -> str:
    return files("llama_adapter_v2.serve").joinpath("chat.html").read_text(encoding="utf-8")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes ``limit``."""
    too_large = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise APIError(400, f"body is not valid JSON ({err})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "body is nested too deeply", code="invalid_json") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        raise validation_error(list(err.errors())) from None


@dataclass(frozen=True)
class Answer:
    """The identity of one chat completion, shared by its response or all its chunks."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, completion: Completion, prompt_tokens: int) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                  "finish_reason": finish_reason(completion), "logprobs": None}
        return {**self.envelope("chat.completion"), "choices": [choice],
                "usage": usage(completion, prompt_tokens)}

    def chunk(self, delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return event({**self.envelope("chat.completion.chunk"), "choices": [choice]})


def finish_reason(completion: Completion) -> str:
    return "stop" if completion.stopped else "length"


def usage(completion: Completion, prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion.new_tokens,
            "total_tokens": prompt_tokens + completion.new_tokens}


def unavailable(err: BaseException | None) -> APIError:
    return APIError(503, f"server busy: {err}; retry later", type="server_error", code="overloaded")


def event(data: dict[str, Any] | str) -> str:
    """One server-sent event as OpenAI sends it: a ``data:`` line and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class ChatService:
    """What the routes do, for one loaded model: parse, check, queue, answer or stream."""

    def __init__(self, loaded: LoadedModel, card: ModelCard, options: ServeOptions) -> None:
        self.loaded, self.card, self.options = loaded, card, options
        self.queue = GenerationQueue(loaded.model, loaded.tokenizer, max_batch=options.max_batch,
                                     max_waiting=options.max_waiting)
        self.prompt_tokenizer = copy.deepcopy(loaded.tokenizer)  # the worker thread keeps the model's own
        self.limit = context_limit(loaded.model)
        # one thread: the prompt tokenizer is used by it alone, and parsing waits there, not on the loop
        self.preparing = ThreadPoolExecutor(1, thread_name_prefix="lav2-prepare")

    async def check_key(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    async def prepared(self, raw: bytes) -> tuple[ChatRequest, FittedPrompt]:
        """The parsed body and its fitted prompt, worked out on the preparing thread."""
        def prepare() -> tuple[ChatRequest, FittedPrompt]:
            body = parse_chat_request(raw)
            return body, self.fitted(body)

        return await asyncio.get_running_loop().run_in_executor(self.preparing, prepare)

    def fitted(self, body: ChatRequest) -> FittedPrompt:
        if body.model != self.card.id:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                           f"{self.card.id!r}", param="model", code="model_not_found")
        chat = chat_input(body.messages, self.options.image_limits)
        if chat.image is not None and self.loaded.model.image_transform is None:
            raise APIError(400, "this model has no visual path; send text only", param="messages")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        return fitted_prompt(body, chat, self.prompt_tokenizer, limit=self.limit,
                             defaults=self.options.defaults, seed=seed)

    def submit(self, fitted: FittedPrompt, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> Future[Completion]:
        try:
            return self.queue.submit(fitted.prompt, fitted.settings, on_text, cancel)
        except QueueFullError as err:
            raise unavailable(err) from None

    async def answer(self, fitted: FittedPrompt) -> JSONResponse:
        try:
            completion = await asyncio.wrap_future(self.submit(fitted))
        except ShuttingDownError as err:
            raise unavailable(err) from None
        return JSONResponse(Answer(self.card.id).body(completion, fitted.prompt_tokens))

    def stream(self, fitted: FittedPrompt, include_usage: bool) -> StreamingResponse:
        """Pieces as the worker settles them; the request is queued before the response starts, so a
        full queue is still a 503 and not a broken stream."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        client_gone = threading.Event()
        future = self.submit(fitted, lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece),
                             client_gone)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        answer = Answer(self.card.id)

        async def events() -> AsyncIterator[str]:
            try:
                yield answer.chunk({"role": "assistant", "content": ""})
                while (piece := await pieces.get()) is not None:
                    yield answer.chunk({"content": piece})
            finally:  # closed or cancelled before the end: the client has gone, stop generating
                if not future.done():
                    client_gone.set()
            if isinstance(future.exception(), ShuttingDownError):
                yield event(unavailable(future.exception()).body())
            elif future.exception() is not None:
                yield event(APIError(500, "generation failed", type="server_error").body())
            else:
                completion = future.result()
                yield answer.chunk({}, finish_reason(completion))
                if include_usage:
                    yield event({**answer.envelope("chat.completion.chunk"), "choices": [],
                                 "usage": usage(completion, fitted.prompt_tokens)})
            yield event("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def health(self) -> dict[str, Any]:
        stats = self.queue.stats
        return {"status": "ok", "model": self.card.id, "version": self.card.version,
                "alias": self.card.alias, "auth": self.options.api_key is not None,
                "waiting": self.queue.waiting,
                "answered": stats.answered, "batches": stats.batches, "largest_batch": stats.largest_batch,
                "cancelled": stats.cancelled}


def v1_routes(service: ChatService) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(service.check_key)])
    card = service.card

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body, fitted = await service.prepared(await read_body(request, service.options.max_body_bytes))
        if body.stream:
            return service.stream(fitted, bool(body.stream_options and body.stream_options.include_usage))
        return await service.answer(fitted)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card.as_openai()]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != card.id:
            raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
        return card.as_openai()

    return v1


def create_app(loaded: LoadedModel, card: ModelCard, options: ServeOptions) -> FastAPI:
    """The app for one loaded model; the generation worker runs while the app does."""
    service = ChatService(loaded, card, options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.queue.start()
        yield
        service.preparing.shutdown(wait=False, cancel_futures=True)
        service.queue.close()

    # no /docs: FastAPI's documentation pages load their scripts from a CDN
    app = FastAPI(title="lav2 serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    app.include_router(v1_routes(service))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page(), headers={"Content-Security-Policy": PAGE_POLICY})

    return app
