"""Load test of serve.py: requests/s and time to first token with 1, 4 and 16 concurrent clients. Run by hand.

    python bench/bench_serve.py --load                 # the tiny model, then a Qwen2-0.5B-shaped one (a few minutes)
    python bench/bench_serve.py --load --models tiny   # seconds

Each model is served by `python serve.py` in a subprocess on 127.0.0.1 (fp32, CPU, --max-batch 16). The same
--requests requests (mixed prompt lengths and answer lengths, every answer generated to its max_tokens with
ignore_eos) go through C client threads, each sending its next request when its last one has finished:
C = 1 is the one-at-a-time baseline; C = 4 and 16 let the scheduler batch. Time to first token (TTFT) is the time
from sending a streamed request to its first server-sent event, which the server sends with the first token.

    tiny   the tests' tiny OneVision checkpoint (tests/tiny_checkpoints.py); half the requests carry an image
    0.5b   random weights with Qwen2-0.5B's decoder (24 layers, 896 wide, 14 heads / 2 kv heads, 151,936-token tied
           head) behind the tiny SigLIP tower; text requests (an image's prefill would dominate on 2 cores). Written
           once by export.save_pretrained into --cache-dir, with the tiny tokenizer (ids past it decode to nothing)
"""

import argparse
import base64
import dataclasses
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import photo  # noqa: E402

import tiny_checkpoints  # noqa: E402
from convert import load_pretrained  # noqa: E402
from chat_template import load_tokenizer  # noqa: E402
from export import save_pretrained  # noqa: E402
from generate import decode_step  # noqa: E402
from model import Llava, TextConfig, init_fresh  # noqa: E402
from batching import BatchCache  # noqa: E402
from test_serve import running_server  # noqa: E402 (the tests' server in a subprocess)

QWEN2_05B = TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
                       tie_word_embeddings=True, max_position_embeddings=32768)


def checkpoints(cache: Path, names) -> dict[str, Path]:
    tiny = cache / "tiny"
    if not (tiny / "config.json").exists():
        tiny_checkpoints.build("onevision_qwen2", tiny)
    out = {"tiny": tiny}
    if "0.5b" in names:
        out["0.5b"] = big = cache / "qwen2-0.5b-shape"
        if not (big / "config.json").exists():
            print(f"writing random Qwen2-0.5B-shaped weights to {big} (once)", file=sys.stderr)
            small, _ = load_pretrained(str(tiny))
            cfg = dataclasses.replace(small.cfg, text=QWEN2_05B)
            with torch.device("meta"):
                model = Llava(cfg)
            torch.manual_seed(0)
            save_pretrained(init_fresh(model), big, tokenizer=load_tokenizer(tiny, str(tiny)), template="qwen_1_5")
    return {k: v for k, v in out.items() if k in names}


def requests(n: int, images: bool) -> list[dict]:
    """n streamed requests: questions of 2 to 16 words, answers of 32 to 64 tokens; with images, every other one."""
    words = "what is shown here and which colours does the picture have near its left and right edges".split()
    out = []
    for i in range(n):
        text = " ".join(words[j % len(words)] for j in range(i, i + 2 + (i * 5) % 15))
        content = [{"type": "text", "text": text}]
        if images and i % 2:
            buf = io.BytesIO()
            photo(40 + 8 * i, 30 + 4 * i, seed=i).save(buf, format="PNG")
            content.append({"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": 32 + (i * 7) % 33,
                    "stream": True, "ignore_eos": True})
    return out


def one(url: str, body: dict) -> tuple[float, float, int]:
    """(seconds to the first event, seconds to [DONE], tokens) of one streamed request."""
    t0, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - t0
            if line.startswith("data: {") and '"finish_reason": "length"' in line:
                tokens = body["max_tokens"]
    assert tokens, "a request ended before its max_tokens"
    return first, time.perf_counter() - t0, tokens


@torch.inference_mode()
def decode_steps(folder: Path, sizes=(1, 4, 16), length: int = 100) -> dict[int, float]:
    """Seconds of one batched decode step (serve.py's, on batching.BatchCache) for n rows of `length` positions, in this
    process and without HTTP: the ceiling the load test can approach (min of 5 after a warm-up)."""
    model, _ = load_pretrained(str(folder))
    out = {}
    for n in sizes:
        cache = BatchCache(model.cfg.text, n, torch.float32, "cpu")
        cache.reserve(length + 1, n)
        cache.lengths = torch.full((n,), length)
        capacity = cache.k.shape[3]
        visible = torch.arange(capacity)[None] <= cache.lengths[:, None]
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            decode_step(model, torch.zeros(n, 1, dtype=torch.long), cache.lengths[:, None],
                        torch.tensor([capacity - 1]), cache, visible)
            times.append(time.perf_counter() - t0)
        out[n] = min(times[1:])
    return out


def load(url: str, bodies: list[dict], clients: int) -> dict:
    """Every request once, through `clients` threads; requests/s, tokens/s and TTFT median / p95."""
    todo, results, lock = list(bodies), [], threading.Lock()

    def client():
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop(0)
            results.append(one(url, body))

    before = httpx.get(f"{url}/health").json()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    after = httpx.get(f"{url}/health").json()
    steps = after["decode_steps"] - before["decode_steps"]
    step_s = (after["decode_seconds"] - before["decode_seconds"]) / max(steps, 1)
    return dict(clients=clients, requests=len(results), tokens=sum(r[2] for r in results), wall_s=wall,
                req_per_s=len(results) / wall,
                tok_per_s=sum(r[2] for r in results) / wall, ttft_median_s=statistics.median(ttft),
                ttft_p95_s=ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
                peak_running=after["peak_running"], decode_steps=steps, decode_step_s=step_s,
                decode_share=(after["decode_seconds"] - before["decode_seconds"]) / wall)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", action="store_true", help="run the load test (the only measurement here)")
    p.add_argument("--models", nargs="+", default=["tiny", "0.5b"], choices=["tiny", "0.5b"])
    p.add_argument("--requests", type=int, default=24, help="requests per run on the 0.5b model")
    p.add_argument("--tiny-requests", type=int, default=96, help="requests per run on the tiny model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
    p.add_argument("--cache-dir", default="/tmp/llava-bench-serve")
    p.add_argument("--json", default=None, help="also write the figures as one JSON object")
    args = p.parse_args()
    if not args.load:
        p.error("choose --load")
    sys.setswitchinterval(1e-4)  # 16 client threads in this process: hand the GIL over at each event, as serve.py does
    rows = []
    for name, folder in checkpoints(Path(args.cache_dir), args.models).items():
        steps = decode_steps(folder)
        print(f"{name:5s} decode step alone: " + ", ".join(f"{n} rows {t * 1e3:.0f} ms ({n / t:.1f} tok/s)"
                                                      for n, t in steps.items()), flush=True)
        rows.append(dict(model=name, decode_step_s=steps))
        bodies = requests(args.tiny_requests if name == "tiny" else args.requests, images=name == "tiny")
        env = None if args.threads is None else {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with running_server(folder, "--max-batch", "16", env=env, timeout=600) as url:
            one(url, {**bodies[1], "max_tokens": 2})  # warm-up
            for clients in args.clients:
                row = dict(model=name, **load(url, bodies, clients))
                rows.append(row)
                print(f"{name:5s} {clients:3d} clients: {row['req_per_s']:7.3f} req/s  {row['tok_per_s']:7.1f} tok/s  "
                      f"TTFT median {row['ttft_median_s']:6.2f} s  p95 {row['ttft_p95_s']:6.2f} s  "
                      f"(wall {row['wall_s']:.1f} s, peak batch {row['peak_running']}, {row['decode_steps']} steps of "
                      f"{row['decode_step_s'] * 1e3:.0f} ms: {row['decode_share']:.0%} of the wall)", flush=True)
        runs = [r for r in rows if r["model"] == name and "clients" in r]
        base = next(r for r in runs if r["clients"] == 1)
        for r in runs:
            r["speedup_vs_one_at_a_time"] = r["req_per_s"] / base["req_per_s"]
        print(f"{name}: " + ", ".join(f"{r['clients']} clients {r['speedup_vs_one_at_a_time']:.2f}x" for r in runs),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
