"""An OpenAI-compatible server with continuous batching, and a web page to ask a model about an image.

    python serve.py --model NAME [--host 127.0.0.1] [--port 8000] [--image-dir DIR] [--max-batch 16] [--max-queue 64]

    POST /v1/chat/completions   messages (text, image_url parts: data: URLs, or paths under --image-dir), stream
    GET  /v1/models, /health    the served model; {"status", "running", "queued", ...}
    GET  /                      the page (serve.html): choose or paste an image, ask, the answer streams in

A request becomes a prompt exactly as infer.py builds one (data.place_visuals, render_prompt in the model's own
template, anyres.process_images, tokenize), so a greedy request answers what `python infer.py IMAGE "Q"` answers.
The defaults are infer.py's, not OpenAI's: temperature 0 (greedy), max_tokens 256 (cut to the context window).
Each request samples with its own generator: `seed` reproduces infer.py --seed's sample, and a request without one
draws a fresh seed (OpenAI's behaviour: asking again gives another sample).
The one new idea is the scheduler (batching.py): continuous batching, as in nano-vllm and vLLM's v1 scheduler.

    handlers (event loop)  validate, build the prompt --submit--> the scheduler (a thread), which decodes every
                           request in flight together and posts each one's text back to its handler's queue

The stack: FastAPI on uvicorn (what vLLM and SGLang use), an optional dependency of this file alone
(requirements-serve.txt). It gives server-sent events as an async generator, a send that fails once the client
has gone (so a dropped stream frees its batch row at the next token), and an event loop that holds thousands of
open streams while one thread owns the model; http.server would need all three written by hand.
"""

import argparse
import asyncio
import base64
import binascii
import io
import json
import random
import sys
import time
import uuid
from pathlib import Path

import infer
from anyres import ImageTooLarge, num_image_tokens, process_images
from batching import Scheduler, Sequence
from chat_template import past_vocab
from data import TEMPLATES, SampleError, load_image, place_visuals, render_prompt, stop_token_ids, system_slot, tokenize

DEFAULT_MAX_TOKENS = 256  # infer.py's --max-new-tokens
MAX_IMAGE_BYTES = 32 << 20  # one data: URL, decoded
MAX_BODY_BYTES = 64 << 20  # one request (413 past it): two images at the data: URL limit, in base64
MAX_REQUEST_PIXELS = 1 << 26  # 67M pixels over a request's images, read from their headers before any is decoded
MAX_STOP_CHARS = 256  # one stop string: the hold-back check costs its length squared at every token


# ----------------------------------------------------------------------------------------------------------------
# A request -> a prompt; anything wrong is a BadRequest naming the field (the OpenAI error object's `param`)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def check(ok: bool, message: str, param: str):
    if not ok:
        raise BadRequest(f"{param}: {message}", param)


def number(body, key, low, high, default, kind=float):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    check(ok and low <= value <= high, f"expected {'a number' if kind is float else 'an integer'} in [{low}, {high}], "
          f"got {json.dumps(value)}", key)
    return kind(value)


def sampling(body: dict) -> dict:
    """The sampling fields, checked; unsupported ones are refused, not silently ignored."""
    check(body.get("n") in (None, 1), "only n = 1 is supported (one choice per request)", "n")
    for key in ("tools", "tool_choice", "functions", "function_call", "audio", "logprobs", "top_logprobs",
                "logit_bias"):
        check(body.get(key) in (None, False, [], {}), "not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        check(body.get(key) in (None, 0), "not supported by this server (only 0)", key)
    check(body.get("response_format") in (None, {"type": "text"}), "only {\"type\": \"text\"} is supported",
          "response_format")
    check(isinstance(body.get("stream") or False, bool), "expected true or false", "stream")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                            for s in stop),
          f"expected a string or a list of at most 4 strings of 1-{MAX_STOP_CHARS} characters", "stop")
    seed = number(body, "seed", -(1 << 63), (1 << 63) - 1, None, int)
    return dict(max_key=key, max_tokens=number(body, key, 1, 1 << 31, None, int),
                temperature=number(body, "temperature", 0, 2, 0.0), top_p=number(body, "top_p", 1e-9, 1, 1.0),
                seed=random.randrange(1 << 63) if seed is None else seed, stop=stop)


def read_image(url, image_dir: Path | None, param: str, pixels_left: int):
    """A PIL image from a data: URL, or a file under --image-dir; never from the network or elsewhere on disk.
    Its header's size must fit in the request's `pixels_left`, checked before the image is decoded."""
    check(isinstance(url, str) and url, "expected a URL string", param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        check(header.endswith(";base64"), "only base64 data: URLs are read (data:image/png;base64,...)", param)
        check(len(payload) * 3 // 4 <= MAX_IMAGE_BYTES, f"larger than {MAX_IMAGE_BYTES >> 20} MB", param)
        try:
            source = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"{param}: the data: URL is not valid base64", param) from None
        name = "the data: URL"
    else:
        check(not url.startswith(("http://", "https://")), "this server fetches nothing from the network; send the "
              "image inline as a data: URL (base64)", param)
        check(image_dir is not None, "local paths are read only under --image-dir, which this server was not "
              "given; send the image as a data: URL", param)
        check("\0" not in url, "a path cannot hold a NUL character", param)
        source = (image_dir / url.removeprefix("file://")).resolve()
        check(source.is_relative_to(image_dir), f"{url} is outside --image-dir", param)
        name = url
    width, height = header_size(source)
    check(width * height <= pixels_left, f"{width} x {height} pixels; this request's images may hold "
          f"{MAX_REQUEST_PIXELS:,} pixels in all; send smaller images", param)
    try:
        return load_image(source)
    except SampleError as e:
        raise BadRequest(f"{param}: {str(e).replace(str(source), name)}", param) from None


def header_size(source) -> tuple[int, int]:
    """An image's size as its header declares it, nothing decoded; (0, 0) when unreadable (load_image says why)."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            return image.size
    except Exception:  # unreadable, missing, too large for Pillow: load_image gives the one-line reason
        return 0, 0
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)


def conversation(messages, image_dir) -> tuple[list[tuple[str, str]], list]:
    """OpenAI messages -> ([(role, text with one <image> per image)], PIL images in prompt order)."""
    check(isinstance(messages, list) and messages, "expected a non-empty list of messages", "messages")
    turns, images, pixels_left = [], [], MAX_REQUEST_PIXELS  # what the request's images may still hold
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        check(isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant"),
              "expected an object with role system, user or assistant", f"{param}.role")
        content, texts, found = m.get("content"), [], []
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        check(isinstance(parts, list), "expected a string or a list of content parts", f"{param}.content")
        for j, part in enumerate(parts):
            where = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                check(m["role"] == "user", "images go in user messages", where)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                found.append(read_image(url, image_dir, f"{where}.image_url", pixels_left))
                pixels_left -= found[-1].width * found[-1].height
            else:
                raise BadRequest(f"{where}: expected {{\"type\": \"text\", \"text\": ...}} or {{\"type\": "
                                 f"\"image_url\", \"image_url\": {{\"url\": ...}}}}", where)
        try:  # images without an <image> placeholder go in front of the text, as infer.py puts them
            text, _ = place_visuals("\n".join(texts), len(found), False)
        except ValueError as e:
            raise BadRequest(f"{param}.content: {e}", f"{param}.content") from None
        turns.append(("system" if m["role"] == "developer" else m["role"], text))
        images += found
    return turns, images


def render(template: str, turns) -> str:
    """The prompt in the model's template; a system message takes the default system sentence's place (chat.py)."""
    system = "\n".join(text for role, text in turns if role == "system")
    turns = [(role, text) for role, text in turns if role != "system"]
    check(bool(turns) and turns[0][0] == "user", "the conversation must start with a user message", "messages")
    check(turns[-1][0] == "user", "the last message must be the user's", "messages")
    slot = system_slot(template)
    if system and slot is None:  # no system sentence in this template: the message opens the first turn
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    text = render_prompt(template, turns)
    return slot[0] + system + slot[1] + text[len(TEMPLATES[template].system):] if system and slot else text


def prepare(body, server) -> tuple[Sequence, bool, bool]:
    """(sequence to generate, stream?, a usage chunk at the end of the stream?) from a request body."""
    check(isinstance(body, dict), "expected a JSON object", "body")
    if body.get("model") not in (None, *server.names):  # OpenAI's and vLLM's answer to an unknown model: 404
        raise BadRequest(f"model: {body.get('model')!r} is not served here; this server serves {server.name!r} "
                         f"(GET /v1/models)", "model", 404)
    params = sampling(body)
    turns, images = conversation(body.get("messages"), server.image_dir)
    model, cfg = server.model, server.model.cfg
    check(not images or model.vision_tower is not None, "this is a text-only model; it cannot take images", "messages")
    window, key = cfg.text.max_position_embeddings, params["max_key"]
    visual = sum(num_image_tokens(im.size, cfg, len(images)) for im in images)  # before any pixel is processed
    check(visual < window, f"the {len(images)} images alone are {visual} tokens but this model reads at most "
          f"{window}; send fewer or smaller images", "messages")
    try:
        processed = process_images(images, cfg) if images else []
    except ImageTooLarge as e:  # a strip within the pixel budget whose padded square is not
        raise BadRequest(f"messages: {e}; crop or resize it first", "messages") from None
    ids = tokenize(server.tokenizer, render(server.template, turns), [im.num_tokens for im in processed], cfg.compat)
    n = len(ids)
    problem = past_vocab(server.tokenizer, ids, cfg.text.vocab_size)
    check(problem is None, str(problem), "messages")
    check(n < window, f"the prompt is {n} tokens ({visual} of them for {len(images)} images) but this model "
          f"reads at most {window}; send fewer or smaller images or less text", "messages")
    max_new = params["max_tokens"]
    check(max_new is None or n + max_new <= window, f"{n} prompt tokens + {max_new} new ones pass the context "
          f"window of {window} tokens; ask for at most {window - n}", key)
    seq = Sequence(ids, processed, max_new or min(DEFAULT_MAX_TOKENS, window - n), params["temperature"],
                   params["top_p"], params["seed"], params["stop"], token_ids=bool(body.get("return_token_ids")),
                   ignore_eos=bool(body.get("ignore_eos")))
    options = body.get("stream_options") or {}
    check(isinstance(options, dict), "expected an object like {\"include_usage\": true}", "stream_options")
    check(not options or body.get("stream"), "only allowed when stream is true (OpenAI's rule)", "stream_options")
    return seq, body.get("stream", False), bool(options.get("include_usage"))


# ----------------------------------------------------------------------------------------------------------------
# HTTP


class Server:
    def __init__(self, args, model, tokenizer, eos: set[int], template: str):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.name = args.model
        self.names = {args.model, Path(args.model.rstrip("/")).name}
        self.image_dir = Path(args.image_dir).resolve() if args.image_dir else None
        self.scheduler = Scheduler(model, tokenizer, stop_token_ids(tokenizer, template, eos), args.max_batch,
                                   args.max_queue)


def error_body(message: str, kind: str, param: str | None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def make_app(server: Server):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="LLaVA", docs_url=None, redoc_url=None)
    page = Path(__file__).with_name("serve.html")

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), e.status, headers=headers)

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):
        print(f"error: {request.url.path}: {e!r}", file=sys.stderr)
        return JSONResponse(error_body(f"internal error: {e}", "server_error", None, 500), 500)

    @app.get("/")
    async def index():
        return HTMLResponse(page.read_text())

    @app.get("/health")
    async def health():
        s = server.scheduler
        return {"status": "ok", "model": server.name, "running": len(s.running),
                "queued": sum(not seq.cancelled for seq in list(s.waiting)),  # those whose clients are still there
                "peak_running": s.peak, "decode_steps": s.steps, "decode_seconds": round(s.step_s, 3),
                "max_batch": s.max_batch, "max_queue": s.max_queue}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "local",
                                            "max_model_len": server.model.cfg.text.max_position_embeddings}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await read_body(request)
        seq, stream, include_usage = await asyncio.to_thread(prepare, body, server)  # image decoding off the loop
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seq.post = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        if not server.scheduler.submit(seq):
            raise BadRequest(f"the server is busy: {server.scheduler.max_queue} requests are already waiting "
                             "(--max-queue); retry later", None, 503, "server_overloaded")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if stream:
            return StreamingResponse(sse(request, seq, events, head, include_usage), media_type="text/event-stream")
        return await collect(request, seq, events, head)

    return app


async def read_body(request):
    """The request's JSON body: sent as application/json or with no Content-Type (as FastAPI reads a body), never as
    a form or text/plain, which a page elsewhere may post without the browser asking this server first; at most
    MAX_BODY_BYTES (413 past it, as its Content-Length or as it arrives)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("", "application/json"):
        raise BadRequest(f"Content-Type {kind}: expected application/json", "body", 415)
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise BadRequest(f"the request is larger than {MAX_BODY_BYTES >> 20} MB", "body", 413)
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the request is larger than {MAX_BODY_BYTES >> 20} MB", "body", 413)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
        raise BadRequest(f"the request body is not valid JSON: {e}", "body") from None


async def collect(request, seq: Sequence, events: asyncio.Queue, head: dict) -> dict | None:
    """The whole answer as one chat.completion; a client that has gone (checked each second, tokens flowing or
    not) cancels it."""
    text, finish, usage, ids = "", None, None, None
    checked = time.monotonic()
    try:
        while finish is None:
            try:
                event = await asyncio.wait_for(events.get(), 1.0)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= 1.0:
                if await request.is_disconnected():
                    return None
                checked = time.monotonic()
            if event is None:
                continue
            if event[0] == "error":
                raise BadRequest(event[1], None, 500, "server_error")
            if event[0] == "delta":
                text += event[1]
            else:
                finish, usage, ids = event[1:]
    finally:
        seq.cancelled = finish is None
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
              "logprobs": None, **({"token_ids": ids} if seq.token_ids else {})}
    return {**head, "object": "chat.completion", "usage": usage, "choices": [choice]}


async def sse(request, seq: Sequence, events: asyncio.Queue, head: dict, include_usage: bool):
    """Server-sent events as OpenAI's client reads them: a role chunk (with the first token, so that a client's
    time to first chunk is its time to first token), content chunks, the finish chunk, an optional usage chunk,
    then [DONE]. A client that has gone cancels the sequence (its row leaves at the next step)."""
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]}
        return f"data: {json.dumps(body)}\n\n"

    done, started = False, False
    try:
        while not done:
            event = await events.get()
            if await request.is_disconnected():
                return
            if not started and event[0] != "error":
                yield chunk({"role": "assistant", "content": ""})
                started = True
            if event[0] == "delta":
                if event[1]:
                    yield chunk({"content": event[1]})
            elif event[0] == "error":
                yield f"data: {json.dumps(error_body(event[1], 'server_error', None, 500))}\n\n"
                done = True
            else:
                yield chunk({}, event[1], **({"token_ids": event[3]} if seq.token_ids else {}))
                if include_usage:  # OpenAI's usage chunk: no choices
                    usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": event[2]}
                    yield f"data: {json.dumps(usage)}\n\n"
                done = True
        yield "data: [DONE]\n\n"
    finally:
        seq.cancelled = seq.cancelled or not done


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    infer.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--image-dir", default=None, help="a folder whose files requests may name by path (file://...); "
                                                     "without it only data: URLs are read")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch row; more get 503")
    p.error = lambda message: sys.exit(f"error: {message}; see python serve.py --help")
    args = p.parse_args(argv)
    for ok, message in [(0 <= args.port < 65536, f"--port {args.port}: expected 0-65535"),
                        (args.max_batch >= 1, f"--max-batch {args.max_batch}: expected 1 or more"),
                        (args.max_queue >= 1, f"--max-queue {args.max_queue}: expected 1 or more"),
                        (args.image_dir is None or Path(args.image_dir).is_dir(),
                         f"--image-dir {args.image_dir}: no such folder")]:
        if not ok:
            sys.exit(f"error: {message}")
    return args


def main(argv=None):
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        sys.exit(f"error: serve.py needs FastAPI and uvicorn ({e.name} is missing): "
                 "pip install -r requirements-serve.txt")
    args = parse_args(argv)
    # the scheduler thread runs Python between torch calls; at the default 5 ms switch interval the event loop
    # waits that long for the GIL at every token it streams (a tiny model then serves 40 tok/s instead of 400)
    sys.setswitchinterval(1e-4)
    model, tokenizer, eos, template = infer.load(args)
    server = Server(args, model, tokenizer, eos, template)
    print(f"serving {args.model} ({template}) on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(make_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
