"""An OpenAI-compatible server with continuous batching, and a web page to ask a model about an image.

    python serve.py --model NAME [--host 127.0.0.1] [--port 8000] [--image-dir DIR] [--max-batch 16] [--max-queue 64]

    POST /v1/chat/completions   messages (text, image_url parts: data: URLs, or paths under --image-dir), stream
    GET  /v1/models, /health    the served model; {"status", "running", "queued", ...}
    GET  /                      the page (serve.html): choose or paste an image, ask, the answer streams in

A request becomes a prompt exactly as infer.py builds one (data.place_visuals, render_prompt in the model's own
template, anyres.process_images, tokenize), so a greedy request answers what `python infer.py IMAGE "Q"` answers.
The defaults are infer.py's, not OpenAI's: temperature 0 (greedy), max_tokens 256 (cut to the context window),
seed 0; each request samples with its own generator, so `seed` reproduces infer.py --seed's sample.
The one new idea is the scheduler: continuous batching, as in nano-vllm and vLLM's v1 scheduler, without paging.

    handlers (event loop)  validate, build the prompt --submit--> waiting (a deque of at most --max-queue; 503 past it)
    scheduler (a thread)   each step: drop cancelled sequences -> admit waiting ones while the batch has room,
                           prefilling each alone (batch 1, so its first token is the one-at-a-time one) and copying
                           its keys/values into a row of the batch cache -> one decode step for every running row
    batch cache            (layers, rows, kv_heads, capacity, hd): row i holds its sequence left-aligned, lengths[i]
                           positions; each row writes its next token at its own position, masked past its length
    tokens --> text        decoded per step on the scheduler; stop ids, stop strings and max_tokens end a sequence,
                           which leaves the batch at once (its row is refilled by the last row)

The stack: FastAPI on uvicorn (what vLLM and SGLang use), an optional dependency of this file alone
(requirements-serve.txt). It gives server-sent events as an async generator, a send that fails once the client
has gone (so a dropped stream frees its batch row at the next token), and an event loop that holds thousands of
open streams while one thread owns the model; http.server would need all three written by hand.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import io
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

import infer
from anyres import process_images
from data import TEMPLATES, SampleError, load_image, place_visuals, render_prompt, stop_token_ids, system_slot, tokenize
from generate import decode_step, gemv_context, sample
from model import KVCache

DEFAULT_MAX_TOKENS = 256  # infer.py's --max-new-tokens
MAX_IMAGE_BYTES = 32 << 20  # one data: URL, decoded


# ----------------------------------------------------------------------------------------------------------------
# A request -> a prompt; anything wrong is a BadRequest naming the field (the OpenAI error object's `param`)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


@dataclass
class Sequence:
    """One request in flight: its prompt, sampling, the tokens so far and the queue its handler reads."""
    ids: list[int]
    images: list
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    post: object = None  # post(event), any thread: ("delta", text) | ("done", finish, usage, ids) | ("error", msg)
    out: list[int] = field(default_factory=list)
    sent: str = ""  # text already posted
    cancelled: bool = False  # set by the handler when its client has gone
    token_ids: bool = False  # return the answer's ids too (vLLM's return_token_ids)
    ignore_eos: bool = False  # generate max_tokens whatever comes (vLLM's ignore_eos; benchmarks)


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
    check(body.get("n", 1) == 1, "only n = 1 is supported (one choice per request)", "n")
    for key in ("tools", "tool_choice", "functions", "function_call", "audio", "logprobs", "top_logprobs"):
        check(body.get(key) in (None, False, []), "not supported by this server", key)
    check(body.get("response_format") in (None, {"type": "text"}), "only {\"type\": \"text\"} is supported",
          "response_format")
    check(isinstance(body.get("stream", False), bool), "expected true or false", "stream")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    check(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
          "expected a string or a list of at most 4 non-empty strings", "stop")
    return dict(max_key=key, max_tokens=number(body, key, 1, 1 << 31, None, int),
                temperature=number(body, "temperature", 0, 2, 0.0), top_p=number(body, "top_p", 1e-9, 1, 1.0),
                seed=number(body, "seed", 0, (1 << 63) - 1, 0, int), stop=stop)


def read_image(url, image_dir: Path | None, param: str):
    """A PIL image from a data: URL, or a file under --image-dir; never from the network or elsewhere on disk."""
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
        source = (image_dir / url.removeprefix("file://")).resolve()
        check(source.is_relative_to(image_dir), f"{url} is outside --image-dir", param)
        name = url
    try:
        return load_image(source)
    except SampleError as e:
        raise BadRequest(f"{param}: {str(e).replace(str(source), name)}", param) from None


def conversation(messages, image_dir) -> tuple[list[tuple[str, str]], list]:
    """OpenAI messages -> ([(role, text with one <image> per image)], PIL images in prompt order)."""
    check(isinstance(messages, list) and messages, "expected a non-empty list of messages", "messages")
    turns, images = [], []
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
                found.append(read_image(url, image_dir, f"{where}.image_url"))
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
    check(body.get("model") in (None, *server.names), f"model {body.get('model')!r} is not served here; this "
          f"server serves {server.name!r} (GET /v1/models)", "model")
    params = sampling(body)
    turns, images = conversation(body.get("messages"), server.image_dir)
    model, cfg = server.model, server.model.cfg
    check(not images or model.vision_tower is not None, "this is a text-only model; it cannot take images", "messages")
    processed = process_images(images, cfg) if images else []
    ids = tokenize(server.tokenizer, render(server.template, turns), [im.num_tokens for im in processed], cfg.compat)
    window, n, key = cfg.text.max_position_embeddings, len(ids), params["max_key"]
    check(n < window, f"the prompt is {n} tokens ({sum(im.num_tokens for im in processed)} of them for "
          f"{len(images)} images) but this model reads at most {window}; send fewer or smaller images or less text",
          "messages")
    max_new = params["max_tokens"]
    check(max_new is None or n + max_new <= window, f"{n} prompt tokens + {max_new} new ones pass the context "
          f"window of {window} tokens; ask for at most {window - n}", key)
    seq = Sequence(ids, processed, max_new or min(DEFAULT_MAX_TOKENS, window - n), params["temperature"],
                   params["top_p"], params["seed"], params["stop"], token_ids=bool(body.get("return_token_ids")),
                   ignore_eos=bool(body.get("ignore_eos")))
    options = body.get("stream_options") or {}
    check(isinstance(options, dict), "expected an object like {\"include_usage\": true}", "stream_options")
    return seq, body.get("stream", False), bool(options.get("include_usage"))


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching


class BatchCache:
    """Keys and values of the running sequences, (layers, rows, kv_heads, capacity, hd), one row per sequence.

    Row i holds its sequence's `lengths[i]` positions from slot 0; a decode step writes row i's new token at
    slot lengths[i] (its own position) and attends over slots <= lengths[i]. Duck-types model.KVCache for the
    decoder's fixed-slot path (KVCache.update with a slot): the capacity grows in steps of 256 as sequences do."""

    def __init__(self, cfg, rows: int, dtype, device):
        self.cfg, self.rows, self.dtype, self.device = cfg, rows, dtype, device
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (n,) one per running sequence
        self.k = self.v = None
        self.resize(0)

    def resize(self, capacity: int):
        c = self.cfg
        k, v = (torch.zeros(c.num_layers, self.rows, c.num_kv_heads, capacity, c.head_dim, dtype=self.dtype,
                            device=self.device) for _ in range(2))
        if self.k is not None:
            n, old = len(self.lengths), min(self.k.shape[3], capacity)
            k[:, :n, :, :old], v[:, :n, :, :old] = self.k[:, :n, :, :old], self.v[:, :n, :, :old]
        self.k, self.v = k, v

    def reserve(self, positions: int):
        if positions > self.k.shape[3]:
            self.resize(-(-positions // 256) * 256)

    def add(self, single: KVCache):
        """A prefilled batch-1 cache becomes the last row."""
        n, length = len(self.lengths), single.length
        self.reserve(length + 1)
        self.k[:, n, :, :length], self.v[:, n, :, :length] = single.k[:, 0, :, :length], single.v[:, 0, :, :length]
        self.lengths = torch.cat([self.lengths, torch.tensor([length], device=self.device)])

    def remove(self, i: int):
        """Row i leaves; the last row moves into its place (so the running rows stay 0..n-1)."""
        last = len(self.lengths) - 1
        if i != last:
            self.k[:, i], self.v[:, i] = self.k[:, last], self.v[:, last]
            self.lengths[i] = self.lengths[last]
        self.lengths = self.lengths[:last].clone()
        if last == 0:
            self.resize(0)  # an idle server holds no cache

    def update(self, layer: int, k, v, slot=None):
        """k, v (n, kv_heads, 1, hd), written at each row's own position -> the rows' whole buffers."""
        n = k.shape[0]
        rows = torch.arange(n, device=self.device)
        self.k[layer][rows, :, self.lengths], self.v[layer][rows, :, self.lengths] = k[:, :, 0], v[:, :, 0]
        return self.k[layer, :n], self.v[layer, :n]


class Scheduler:
    """The one thread that runs the model: admits waiting sequences into the running batch between decode steps."""

    def __init__(self, model, tokenizer, stop_ids: set[int], max_batch: int, max_queue: int):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting, self.running = collections.deque(), []
        self.peak, self.steps, self.step_s = 0, 0, 0.0  # the largest batch, decode steps and their seconds (/health)
        self.wake = threading.Condition()
        emb = model.language_model.embed_tokens.weight  # the compute dtype (an int8 head's weight is not)
        self.cache = BatchCache(model.cfg.text, max_batch, emb.dtype, emb.device)
        threading.Thread(target=self.loop, daemon=True, name="scheduler").start()

    def submit(self, seq: Sequence) -> bool:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(seq)
            self.wake.notify()
        return True

    def loop(self):
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.waiting and not self.running:
                        self.wake.wait()
                try:
                    self.step()
                except Exception as e:  # a failed decode step fails the sequences in it, never the server
                    print(f"error: decode step: {e!r}", file=sys.stderr)
                    for seq in self.running:
                        seq.post(("error", f"generation failed: {e}"))
                    self.running = []
                    self.cache = BatchCache(self.cache.cfg, self.max_batch, self.cache.dtype, self.cache.device)

    def step(self):
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self.leave(i)
        while len(self.running) < self.max_batch:
            with self.wake:
                seq = self.waiting.popleft() if self.waiting else None
            if seq is None:
                break
            try:
                if not seq.cancelled:
                    self.prefill(seq)
            except Exception as e:  # e.g. out of memory: this request fails, the batch goes on
                print(f"error: prefill: {e!r}", file=sys.stderr)
                seq.post(("error", f"generation failed: {e}"))
        if self.running:
            self.peak, t0 = max(self.peak, len(self.running)), time.perf_counter()
            self.decode()
            self.steps, self.step_s = self.steps + 1, self.step_s + time.perf_counter() - t0

    def prefill(self, seq: Sequence):
        """The prompt alone (batch 1, as generate() runs it), then its keys/values join the batch cache."""
        device = self.cache.device
        seq.generator = torch.Generator(device=device).manual_seed(seq.seed)
        single = KVCache(self.model.cfg.text, 1, len(seq.ids), self.cache.dtype, device)
        logits = self.model(torch.tensor([seq.ids], device=device), seq.images or None, cache=single, num_logits=1)
        seq.images = None  # the pixels are no longer needed
        if not self.accept(seq, sample(logits[0, -1], seq.temperature, seq.top_p, seq.generator)):
            self.cache.add(single)
            self.running.append(seq)

    def decode(self):
        """One token for every running sequence: (n, 1) tokens at each row's own position."""
        cache, n = self.cache, len(self.running)
        cache.reserve(int(cache.lengths.max()) + 1)
        capacity = cache.k.shape[3]
        tokens = torch.tensor([[seq.out[-1]] for seq in self.running], device=cache.device)
        visible = torch.arange(capacity, device=cache.device)[None] <= cache.lengths[:, None]  # (n, capacity)
        slot = torch.tensor([capacity - 1], device=cache.device)  # the decoder's slot mask: every slot, then `visible`
        with gemv_context(self.model, n):  # one row of a bf16 model on CPU: ATen's GEMV (generate.py)
            logits = decode_step(self.model, tokens, cache.lengths[:, None], slot, cache, visible)
        cache.lengths += 1
        for i in reversed(range(n)):
            seq = self.running[i]
            if self.accept(seq, sample(logits[i], seq.temperature, seq.top_p, seq.generator)):
                self.leave(i)

    def leave(self, i: int):
        self.running[i] = self.running[-1]
        self.running.pop()
        self.cache.remove(i)

    def accept(self, seq: Sequence, token: int) -> bool:
        """Add a token, post the new text; True when the sequence has finished."""
        seq.out.append(token)
        stop_ids = () if seq.ignore_eos else self.stop_ids
        text = self.tokenizer.decode([t for t in seq.out if t not in stop_ids])
        finish = "stop" if token in stop_ids else "length" if len(seq.out) >= seq.max_new else None
        cut = min((text.find(s) for s in seq.stop if s in text), default=-1)
        if cut >= 0:  # a stop string ends the answer, and is not part of it (OpenAI's rule)
            text, finish = text[:cut], "stop"
        if finish:
            text = text.strip()  # infer.py's answer
        else:  # hold back what may still change: a partial character, trailing spaces, a stop string's beginning
            text = text.lstrip().removesuffix("\ufffd").rstrip()
            text = text[:len(text) - max((k for s in seq.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                         default=0)]
        new = text[len(seq.sent):] if text.startswith(seq.sent) else ""
        if new or len(seq.out) == 1:  # the first token always posts, text or not: the stream starts with it
            seq.post(("delta", new))
            seq.sent += new
        if finish:
            seq.post(("done", finish, {"prompt_tokens": len(seq.ids), "completion_tokens": len(seq.out),
                                       "total_tokens": len(seq.ids) + len(seq.out)}, list(seq.out)))
        return finish is not None


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
        return {"status": "ok", "model": server.name, "running": len(s.running), "queued": len(s.waiting),
                "peak_running": s.peak, "decode_steps": s.steps, "decode_seconds": round(s.step_s, 3),
                "max_batch": s.max_batch, "max_queue": s.max_queue}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "local",
                                            "max_model_len": server.model.cfg.text.max_position_embeddings}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON: {e}", "body") from None
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


async def collect(request, seq: Sequence, events: asyncio.Queue, head: dict) -> dict | None:
    """The whole answer as one chat.completion; a client that has gone (checked each second) cancels it."""
    text, finish, usage, ids = "", None, None, None
    try:
        while finish is None:
            try:
                event = await asyncio.wait_for(events.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
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
