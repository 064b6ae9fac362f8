"""Continuous batching: one thread runs the model for every request in flight, admitting new ones between decode
steps (as nano-vllm and vLLM's v1 scheduler do, without paging). serve.py feeds it; nothing here knows HTTP.

    submit(seq)            a Sequence joins `waiting` (a deque of at most max_queue; False past it)
    each step              drop cancelled sequences -> admit waiting ones while the batch has room, prefilling each
                           alone (batch 1, so its first token is the one-at-a-time one) and copying its keys/values
                           into a row of the batch cache -> one decode step for every running row
    batch cache            (layers, rows, kv_heads, capacity, hd): row i holds its sequence left-aligned, lengths[i]
                           positions; each row writes its next token at its own position, masked past its length
    tokens --> text        the newest tokens decoded per step; stop ids, stop strings and max_tokens end a sequence,
                           which leaves the batch at once (its row is refilled by the last row); seq.post(event) tells
                           its handler
"""

import collections
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from generate import decode_step, gemv_context, sample
from model import KVCache

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte fallback: <0xE2>


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
    text: str = ""  # the answer's text so far (Scheduler.new_text)
    prefix: int = 0  # out[prefix:read] decodes to text's end; out[read:] is not in text yet
    read: int = 0
    sent: str = ""  # text already posted
    cancelled: bool = False  # set by the handler when its client has gone
    token_ids: bool = False  # return the answer's ids too (vLLM's return_token_ids)
    ignore_eos: bool = False  # generate max_tokens whatever comes (vLLM's ignore_eos; benchmarks)


def ends_in_byte(tokenizer, ids) -> bool:
    """Whether the last of `ids` that decodes to anything is a byte-fallback token (<0xE2>); a special token after it
    decodes to nothing, so the run may still go on past it."""
    for t in reversed(ids):
        if BYTE_TOKEN.fullmatch(tokenizer.id_to_token(t) or ""):
            return True
        if tokenizer.decode([t]):
            return False
    return False


class BatchCache:
    """Keys and values of the running sequences, (layers, rows, kv_heads, capacity, hd), one row per sequence.

    Row i holds its sequence's `lengths[i]` positions from slot 0; a decode step writes row i's new token at
    slot lengths[i] (its own position) and attends over slots <= lengths[i]. Duck-types model.KVCache for the
    decoder's fixed-slot path (KVCache.update with a slot). Rows and capacity grow as sequences join and lengthen
    (rows doubling up to `max_rows`, capacity in steps of 256): a 7B model's 16 rows of 3k positions would hold
    24 GB whether one request runs or sixteen."""

    def __init__(self, cfg, max_rows: int, dtype, device):
        self.cfg, self.max_rows, self.dtype, self.device = cfg, max_rows, dtype, device
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (n,) one per running sequence
        self.k = self.v = None
        self.resize(0, 0)

    def resize(self, rows: int, capacity: int):
        c = self.cfg
        k, v = (torch.zeros(c.num_layers, rows, c.num_kv_heads, capacity, c.head_dim, dtype=self.dtype,
                            device=self.device) for _ in range(2))
        if self.k is not None:
            n, old = len(self.lengths), min(self.k.shape[3], capacity)
            k[:, :n, :, :old], v[:, :n, :, :old] = self.k[:, :n, :, :old], self.v[:, :n, :, :old]
        self.k, self.v = k, v

    def reserve(self, positions: int, rows: int = 0):
        have_rows, have_capacity = self.k.shape[1], self.k.shape[3]
        if positions > have_capacity or rows > have_rows:
            self.resize(have_rows if rows <= have_rows else min(self.max_rows, max(rows, 2 * have_rows)),
                        max(have_capacity, -(-positions // 256) * 256))

    def add(self, single: KVCache):
        """A prefilled batch-1 cache becomes the last row."""
        n, length = len(self.lengths), single.length
        self.reserve(length + 1, n + 1)
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
            self.resize(0, 0)  # an idle server holds no cache

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
            if len(self.waiting) >= self.max_queue:  # those whose clients have gone give their places up first
                self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
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
        finish = "stop" if token in stop_ids else "length" if len(seq.out) >= seq.max_new else None
        seq.text += self.new_text(seq, len(seq.out) - (token in stop_ids), finish is not None)
        text = seq.text
        cut = min((text.find(s) for s in seq.stop if s in text), default=-1)
        if cut >= 0:  # a stop string ends the answer, and is not part of it (OpenAI's rule)
            text, finish = text[:cut], "stop"
        text = text.strip()  # infer.py's answer; while it goes on, trailing spaces wait for what follows them
        if not finish:  # and so does a stop string's beginning
            text = text[:len(text) - max((k for s in seq.stop for k in range(1, min(len(s), len(text) + 1))
                                          if text.endswith(s[:k])), default=0)]
        new = text[len(seq.sent):] if text.startswith(seq.sent) else ""
        if new or len(seq.out) == 1:  # the first token always posts, text or not: the stream starts with it
            seq.post(("delta", new))
            seq.sent += new
        if finish:
            seq.post(("done", finish, {"prompt_tokens": len(seq.ids), "completion_tokens": len(seq.out),
                                       "total_tokens": len(seq.ids) + len(seq.out)}, list(seq.out)))
        return finish is not None

    def new_text(self, seq: Sequence, end: int, final: bool) -> str:
        """The text seq.out[seq.read:end] adds to the answer, decoding only the newest tokens (vLLM's incremental
        detokenizer), so a long answer costs each step the same. Both decodes start at seq.prefix, a token before
        the new ones: SentencePiece drops the leading space of a decode's first token. Until the answer is final,
        text waits while it ends in U+FFFD (each byte of an unfinished character decodes so) or in a byte token
        (SentencePiece's byte fallback decodes a run of them as one: a run that is not UTF-8 becomes all U+FFFD)."""
        tail = seq.out[seq.prefix:end]
        before, after = self.tokenizer.decode(tail[:seq.read - seq.prefix]), self.tokenizer.decode(tail)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd") or ends_in_byte(self.tokenizer, tail)):
            return ""
        seq.prefix, seq.read = seq.read, end
        return after[len(before):]
