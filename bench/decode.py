"""Decode throughput of a 7B-shaped decoder by batch size and weight format, against the device's bandwidth bound.
Run by hand (bench_gpu.sh runs it on one GPU); --small runs the same code on a tiny decoder, on any device.

    python bench/decode.py --device cuda                       # Mistral-7B shape, bf16 + int8, batch 1/8/32
    python bench/decode.py --device cpu --small --batches 1,2  # quick check of the script itself

For each weight format (bf16, int8 from quantize.py) and batch size B: B prompts of 32 random tokens, greedy, then
--new-tokens steps through generate.generation_loop (eager, and with --compile the compiled decode step); tokens/s =
B x steps / seconds from the first to the last step. A decode step reads every decoder weight once whatever B is,
so the bound at batch B is B x bandwidth / (weight bytes + B x KV-cache bytes); the share printed is the measured
rate over that bound, with the bandwidth of a device-to-device copy measured in the same run (and over --peak-gbps,
the datasheet figure, when given). Random weights: the numbers say nothing about answers.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import generate as generation  # noqa: E402
import quantize  # noqa: E402
from model import Llava, LlavaConfig, TextConfig, init_fresh  # noqa: E402


def decoder_config(small: bool) -> LlavaConfig:
    if small:
        text = TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32)
    else:  # LLaVA-1.6-Mistral-7B's decoder
        text = TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=32768)
    return LlavaConfig(vision=None, text=text)


def build(cfg: LlavaConfig, device, weights: str):
    """Random bf16 weights on the device; int8: each matrix quantised as it is made (the bf16 model never exists)."""
    with torch.device("meta"):
        model = Llava(cfg)
    if weights == "int8":
        quantize.quantized_layers(model, "int8")
        for module in model.modules():
            if isinstance(module, quantize.Int8Linear):
                w = torch.randn(module.out_features, module.in_features, device=device) * 0.02
                module.load_weight("weight", w, torch.bfloat16, device)
    init_fresh(model, device=device, dtype=torch.bfloat16)  # everything still on the meta device
    if weights == "int8":
        quantize.quantize_tied_head(model)
    return model.eval()


def bytes_per_step(model, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one step reads: every matrix and norm but the embedding, in its stored dtype."""
    t = model.cfg.text
    tensors = [x for n, x in list(model.named_parameters()) + list(model.named_buffers()) if "embed_tokens" not in n]
    kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * context * 2 * batch  # bf16 keys and values
    return sum(x.numel() * x.element_size() for x in tensors), kv


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB copy on the device (bytes read + bytes written)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() / min(times[1:]) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rate(model, batch: int, new_tokens: int, compile: bool, device) -> float:
    prompts = [torch.randint(10, 500, (32,), generator=torch.Generator().manual_seed(b)).tolist() for b in range(batch)]
    stamps = []
    for step in generation.generation_loop(model, prompts, [[] for _ in prompts], max_new_tokens=new_tokens,
                                      temperature=0.0, top_p=1.0, seed=0, compile=compile):
        sync(device)  # sample() already read the tokens back; this only makes the clock honest
        stamps.append(time.perf_counter())
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a tiny decoder (checks the script)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--weights", default="bf16,int8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also the compiled decode step (CUDA graphs on a GPU)")
    p.add_argument("--peak-gbps", type=float, default=None, help="datasheet bandwidth, GB/s (H100 SXM 3350, H200 4800)")
    args = p.parse_args(argv)
    bandwidth = copy_bandwidth(args.device)
    print(f"device {args.device}: copy {bandwidth:.0f} GB/s"
          + (f", datasheet {args.peak_gbps:.0f} GB/s" if args.peak_gbps else ""))
    print("| weights | batch | compiled | tok/s | bound tok/s (copy) | share of copy bound | share of datasheet |")
    print("|---|---|---|---|---|---|---|")
    for weights in args.weights.split(","):
        model = build(decoder_config(args.small), args.device, weights)
        for batch in map(int, args.batches.split(",")):
            for compile in [False, True] if args.compile else [False]:
                rates = [rate(model, batch, args.new_tokens, compile, args.device) for _ in range(args.repeats + 1)][1:]
                tok_s = statistics.median(rates)
                w, kv = bytes_per_step(model, batch, 32 + args.new_tokens // 2)  # the cache's mean length
                bound = batch * bandwidth * 1e9 / (w + kv)
                peak = f"{tok_s / (batch * args.peak_gbps * 1e9 / (w + kv)):.0%}" if args.peak_gbps else "-"
                print(f"| {weights} | {batch} | {compile} | {tok_s:.1f} | {bound:.1f} | {tok_s / bound:.0%} | {peak} |",
                      flush=True)
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
