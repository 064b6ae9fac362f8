"""Tiny random LLaVA-family checkpoints for tests (test-support module, not library code).

What this module holds
----------------------
* ``build(name, out_dir, seed=0)`` -- builds a tiny RANDOM transformers checkpoint (fp32) for one of
  ``NAMES`` and writes it with ``save_pretrained`` together with a pil-backend image processor and a
  tiny ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``special_tokens_map.json``): SentencePiece-style
  (``METASPACE``: a Metaspace pre-tokenizer with prepend_scheme "first" and byte fallback, as the llava-hf
  LLaVA-1.5 / 1.6-Vicuna / -Mistral / -34B repos ship) or byte-level BPE (the others, as Qwen2 and Llama-3).
* ``make_model(name, seed)`` / ``randomize_(model, seed)`` -- the same model in memory, without saving.
* ``load_reference(path)`` -- loads such a folder back with the matching transformers class (the oracle).
* ``make_processor(name)`` / ``load_processor(path)`` -- the pil-backend image processor.
* ``make_tokenizer(name)`` / ``load_tokenizer(path)`` -- the tiny tokenizer (``tokenizers`` / transformers).
* ``load_full_processor(path)`` -- transformers' combined LlavaProcessor / LlavaNextProcessor (not OneVision).
* ``saved_keys(path)`` -- tensor names stored in a folder (safetensors and .bin shards).
* ``image_token_count(model, inputs)`` / ``example_inputs(name, model, processor, image)`` -- helpers that
  ask the reference model itself how many ``<image>`` tokens an image needs and build matching inputs.
The same checkpoints as the original releases lay them out, and the llava-hf chat templates, are in
tests/tiny_releases.py.

Key names transformers 5.23 writes with ``save_pretrained`` (checked by running tests/tiny_releases.py)
------------------------------------------------------------------------------------------
In memory (5.23): ``model.language_model.*``, ``model.vision_tower.{embeddings,encoder,pre_layrnorm,
post_layernorm}.*`` (NO ``vision_model`` level), ``model.multi_modal_projector.linear_{1,2}.*``,
``model.image_newline``, ``lm_head.weight``.
On disk (``model.safetensors``), the conversion mapping is reversed, so the files use the OLD llava-hf
prefixes for the LLM / projector / newline / head, but the vision tower WITHOUT ``vision_model``:
  ``language_model.model.{embed_tokens,layers.N,norm}.*``, ``language_model.lm_head.weight`` (untied only),
  ``multi_modal_projector.linear_{1,2}.{weight,bias}``, ``image_newline`` (NeXT / OneVision),
  ``vision_tower.{embeddings,encoder.layers.N,pre_layrnorm,post_layernorm}.*``
  (real Hub llava-hf files instead have ``vision_tower.vision_model.*``; transformers 5.23 loads both).
Tied Qwen2 checkpoints store no lm_head at all.
A standalone ``CLIPVisionModel.save_pretrained`` writes ``vision_model.*`` (used for the tower repo).

Token ids (text vocab size is 320 for every model)
--------------------------------------------------
llama / mistral: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3..258 byte alphabet, 259..317 BPE merges,
318 ``<pad>``, 319 ``<image>``. In the Metaspace kind, 3..258 are the byte-fallback tokens ``<0x00>``..``<0xFF>``
(Llama's own layout), 259..285 ``▁`` and a..z, 286..317 merges learned over them.
qwen2: 0..255 byte alphabet, 256..314 merges, 315 ``<|endoftext|>``, 316 ``<|im_start|>``,
317 ``<|im_end|>``, 318 ``<image>``, 319 ``<video>`` (the latter only registered for OneVision;
unused row in next_qwen2).

Image-processor notes (transformers 5.23, pil backend; classes ``*ImageProcessorPil``, torchvision absent)
-------------------------------------------------------------------------------------------------------
* Call as ``processor(images=pil_or_list, return_tensors="pt")``. ``AutoImageProcessor.from_pretrained(path,
  backend="pil")`` reloads them; the saved ``image_processor_type`` is the plain name (e.g. "CLIPImageProcessor").
* NeXT / OneVision: ``pixel_values`` is (num_images, max_patches, 3, S, S) = base image first, then the crops
  (row-major); with several images the shorter ones are zero-padded to the batch's max patch count
  (``do_pad=True``) and the model slices them back using ``image_sizes``. ``image_sizes`` is int64 (H, W) of the
  ORIGINAL image. OneVision also returns ``batch_num_images``; a nested list ``[[a, b]]`` = one multi-image
  sample (each image padded to a square with the mean colour, 1 patch, no anyres).
* llava15 uses CLIPImageProcessor (resize shortest edge + centre crop, no pad) like llava-hf/llava-1.5-*-hf.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import torch

NAMES = ("llava15_llama", "next_llama", "next_mistral", "next_qwen2", "onevision_qwen2")
METASPACE = ("llava15_llama", "next_mistral")  # SentencePiece-style tokenizers, like their real counterparts

VOCAB_SIZE = 320
CLIP_IMAGE_SIZE = 28  # patch 4 -> 7x7 patches
SIGLIP_IMAGE_SIZE = 27  # patch 3 -> 9x9 patches
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
ONEVISION_PINPOINTS = [[i * 27, j * 27] for i in range(1, 7) for j in range(1, 7)]

# Token ids, per tokenizer family (see module docstring).
LLAMA_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 318, "<image>": 319}
QWEN_TOKENS = {"<|endoftext|>": 315, "<|im_start|>": 316, "<|im_end|>": 317, "<image>": 318, "<video>": 319}
IMAGE_TOKEN_ID = {
    "llava15_llama": 319,
    "next_llama": 319,
    "next_mistral": 319,
    "next_qwen2": 318,
    "onevision_qwen2": 318,
}
VIDEO_TOKEN_ID = {"onevision_qwen2": 319}

# Family facts used for the original-layout config.json.
_ORIGINAL = {
    "llava15_llama": dict(model_type="llava_llama", arch="LlavaLlamaForCausalLM",
                          merge="flat", aspect="pad", max_len=2048),
    "next_llama": dict(model_type="llava_llama", arch="LlavaLlamaForCausalLM",
                       merge="spatial_unpad", aspect="anyres", max_len=4096),
    "next_mistral": dict(model_type="llava_mistral", arch="LlavaMistralForCausalLM",
                         merge="spatial_unpad", aspect="anyres", max_len=32768),
    "next_qwen2": dict(model_type="llava_qwen", arch="LlavaQwenForCausalLM",
                       merge="spatial_unpad", aspect="anyres", max_len=32768),
    "onevision_qwen2": dict(model_type="llava_qwen", arch="LlavaQwenForCausalLM",
                            merge="spatial_unpad", aspect="anyres_max_9", max_len=32768),
}

# A fixed little corpus the BPE merges are learned from (deterministic, see _learn_merges).
_BPE_CORPUS = (
    "USER: <image>\nWhat is shown in this image? ASSISTANT: The image shows a cat sitting on the table. "
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. [INST] Describe the picture. [/INST] "
    "system\nYou are a helpful assistant.\nuser\nWhat is in the image?\nassistant\nThere is a dog and a tree."
)


def _family(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown tiny checkpoint {name!r}; expected one of {NAMES}")
    return name.rsplit("_", 1)[1]  # "llama" | "mistral" | "qwen2"


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=CLIP_IMAGE_SIZE, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, projection_dim=16,
    )


def _siglip_vision_config(num_hidden_layers: int = 2):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=SIGLIP_IMAGE_SIZE, patch_size=3, hidden_size=32, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, intermediate_size=64, vision_use_head=False,
    )


def _text_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB_SIZE,
    )
    if family == "llama":
        return LlamaConfig(
            **common, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096,
            bos_token_id=1, eos_token_id=2, pad_token_id=LLAMA_TOKENS["<pad>"],
        )
    if family == "mistral":
        return MistralConfig(
            **common, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
            max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=LLAMA_TOKENS["<pad>"],
        )
    if family == "qwen2":
        return Qwen2Config(
            **common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
            use_sliding_window=False, bos_token_id=QWEN_TOKENS["<|endoftext|>"], eos_token_id=QWEN_TOKENS["<|im_end|>"],
            pad_token_id=QWEN_TOKENS["<|endoftext|>"],
        )
    raise ValueError(family)


def make_config(name: str):
    """The transformers multimodal config of one tiny checkpoint."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    text = _text_config(_family(name))
    tie = text.tie_word_embeddings
    if name == "llava15_llama":
        return LlavaConfig(
            vision_config=_clip_vision_config(), text_config=text, image_token_index=IMAGE_TOKEN_ID[name],
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
            image_seq_length=49, tie_word_embeddings=tie,
        )
    if name.startswith("next_"):
        return LlavaNextConfig(
            vision_config=_clip_vision_config(), text_config=text, image_token_index=IMAGE_TOKEN_ID[name],
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
            image_grid_pinpoints=copy.deepcopy(NEXT_PINPOINTS), image_seq_length=49, tie_word_embeddings=tie,
        )
    return LlavaOnevisionConfig(
        vision_config=_siglip_vision_config(), text_config=text, image_token_index=IMAGE_TOKEN_ID[name],
        video_token_index=VIDEO_TOKEN_ID[name], vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", image_grid_pinpoints=copy.deepcopy(ONEVISION_PINPOINTS),
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=tie,
    )


def _model_class(model_type: str):
    import transformers

    return {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
    }[model_type]


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter from a fixed generator (parameters visited in named_parameters order).

    * biases                          : 0.05 * N(0, 1)
    * LayerNorm / RMSNorm weights     : 1 + 0.1 * N(0, 1)
    * image_newline                   : 0.1 * N(0, 1)
    * CLIP class_embedding            : 0.5 * N(0, 1)
    * token embeddings (= tied head)  : N(0, 1) / sqrt(hidden)  -> tied logits O(1)
    * position embeddings             : 0.5 * N(0, 1)
    * Linear / Conv weights           : N(0, 1) / sqrt(fan_in)  (fan_in = numel / out); this keeps every
      residual stream, attention score and logit O(1) without saturating softmax/GELU.
    """
    gen = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():  # tied lm_head is not listed separately
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = pname.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = 0.05 * noise
        elif pname.endswith("image_newline"):
            value = 0.1 * noise
        elif leaf == "class_embedding":
            value = 0.5 * noise
        elif p.dim() == 1:  # every remaining 1-D weight is a LayerNorm / RMSNorm scale
            value = 1.0 + 0.1 * noise
        elif "position_embedding" in pname:
            value = 0.5 * noise
        elif "embed_tokens" in pname:
            value = noise / math.sqrt(p.shape[1])
        else:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return model


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------


def _learn_merges(alphabet_map: dict[int, str], n_merges: int) -> list[tuple[str, str]]:
    """Deterministic byte-level BPE learner over _BPE_CORPUS (most frequent pair, ties -> smallest pair)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(w for w, _ in pre.pre_tokenize_str(_BPE_CORPUS))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = _count_pairs(words, seqs)
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        _apply_merge(seqs, best)
    # pad with distinct 2-char merges of single bytes if the corpus ran out (it does not for 59/60 merges)
    alphabet = [alphabet_map[i] for i in sorted(alphabet_map)]
    have = {a + b for a, b in merges} | set(alphabet)
    for a in alphabet:
        for b in alphabet:
            if len(merges) >= n_merges:
                return merges
            if a + b not in have:
                merges.append((a, b))
                have.add(a + b)
    return merges


def _count_pairs(words: Counter, seqs: dict, keep=lambda a, b: True) -> Counter:
    """How often each adjacent symbol pair that `keep` accepts occurs, weighted by word frequency."""
    pairs: Counter = Counter()
    for w, c in words.items():
        s = seqs[w]
        for a, b in zip(s, s[1:]):
            if keep(a, b):
                pairs[(a, b)] += c
    return pairs


def _apply_merge(seqs: dict, best: tuple[str, str]):
    """Join every adjacent occurrence of the pair `best` in each word's symbol list, left to right."""
    for w, s in seqs.items():
        out, i = [], 0
        while i < len(s):
            if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                out.append(s[i] + s[i + 1])
                i += 2
            else:
                out.append(s[i])
                i += 1
        seqs[w] = out


def _learn_piece_merges(letters: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Deterministic SentencePiece-style BPE learner over _BPE_CORPUS, restricted to `letters` (other characters
    fall back to bytes): words start with "▁", most frequent pair first, ties -> smallest pair."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words = Counter(w for w, _ in pre.pre_tokenize_str(_BPE_CORPUS))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = _count_pairs(words, seqs, keep=lambda a, b: all(ch in letters for ch in a + b))
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        _apply_merge(seqs, best)
    return merges


def make_metaspace_tokenizer(name: str):
    """A tiny SentencePiece-style `tokenizers.Tokenizer` laid out like the llava-hf Llama / Mistral tokenizer.json:
    BPE with byte fallback, a Metaspace pre-tokenizer (prepend_scheme "first", no split), no normalizer, the
    SentencePiece decoder chain and a "<s> $A" post-processor; same special-token ids as the byte-level kind."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if name not in METASPACE:
        raise ValueError(f"{name} has a byte-level tokenizer; Metaspace ones: {METASPACE}")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    letters = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = _learn_piece_merges(letters, LLAMA_TOKENS["<pad>"] - len(vocab) - len(letters))
    for piece in letters + [a + b for a, b in merges]:
        vocab[piece] = len(vocab)
    vocab.update({"<pad>": LLAMA_TOKENS["<pad>"], "<image>": LLAMA_TOKENS["<image>"]})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(LLAMA_TOKENS, key=LLAMA_TOKENS.get)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    for t, idx in LLAMA_TOKENS.items():
        assert tok.token_to_id(t) == idx, (t, tok.token_to_id(t), idx)
    return tok


def make_tokenizer(name: str):
    """The tiny `tokenizers.Tokenizer` of a checkpoint: Metaspace for METASPACE, else byte-level BPE; special-token
    ids match the model config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if name in METASPACE:
        return make_metaspace_tokenizer(name)

    family = "llama" if _family(name) in ("llama", "mistral") else "qwen2"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    specials = LLAMA_TOKENS if family == "llama" else {k: v for k, v in QWEN_TOKENS.items()}
    if name != "onevision_qwen2":
        specials = {k: v for k, v in specials.items() if k != "<video>"}
    first_free = 3 if family == "llama" else 0
    vocab: dict[str, int] = {}
    if family == "llama":
        vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    for i, ch in enumerate(alphabet):
        vocab[ch] = first_free + i
    n_bpe = min(v for k, v in specials.items() if k not in ("<unk>", "<s>", "</s>"))  # first added id
    merges = _learn_merges({i: ch for i, ch in enumerate(alphabet)}, n_bpe - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == n_bpe, (len(vocab), n_bpe)
    # fill any gap up to the added ids with reserved tokens so ids stay dense
    for tok, idx in sorted(specials.items(), key=lambda kv: kv[1]):
        while len(vocab) < idx:
            vocab[f"<|reserved_{len(vocab)}|>"] = len(vocab)
        vocab.setdefault(tok, idx)
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>" if family == "llama" else None)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for t, idx in specials.items():
        assert tok.token_to_id(t) == idx, (t, tok.token_to_id(t), idx)
    return tok


def _write_tokenizer(name: str, out_dir: Path, model_max_length: int) -> None:
    tok = make_tokenizer(name)
    tok.save(str(out_dir / "tokenizer.json"))
    if _family(name) in ("llama", "mistral"):
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        extra = {"image_token": "<image>"}
        add_bos = True
    else:
        special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        extra = {"image_token": "<image>"}
        if name == "onevision_qwen2":
            extra["video_token"] = "<video>"
        add_bos = False
    cfg = {
        # the llava-hf Llama / Mistral repos name the SentencePiece class, with legacy off (prepend only at the start)
        **({"tokenizer_class": "LlamaTokenizer", "legacy": False} if name in METASPACE
           else {"tokenizer_class": "PreTrainedTokenizerFast"}),
        "model_max_length": model_max_length,
        "padding_side": "right",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
        "extra_special_tokens": extra,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(path: Path):
    """transformers fast tokenizer over a folder written by build()/to_original_layout()."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------
# image processors
# ----------------------------------------------------------------------------------------------------


def make_processor(name: str):
    """The pil-backend image processor matching the tiny checkpoint (llava-hf defaults, tiny sizes)."""
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    _family(name)
    c = CLIP_IMAGE_SIZE
    if name == "llava15_llama":  # llava-hf/llava-1.5-*-hf ship a plain CLIPImageProcessor (centre crop, no pad)
        return CLIPImageProcessorPil(size={"shortest_edge": c}, crop_size={"height": c, "width": c})
    if name.startswith("next_"):
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": c}, crop_size={"height": c, "width": c},
            image_grid_pinpoints=copy.deepcopy(NEXT_PINPOINTS),
        )
    s = SIGLIP_IMAGE_SIZE  # llava-hf OneVision: SigLIP normalisation (0.5 / 0.5), squash to size, no crop
    return LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=copy.deepcopy(ONEVISION_PINPOINTS),
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def load_processor(path: Path):
    """Reload the image processor saved next to a checkpoint, forcing the pil backend."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), backend="pil")


def load_full_processor(path: Path):
    """transformers' combined text+image processor (LlavaProcessor / LlavaNextProcessor) for a build() folder.

    It expands each "<image>" in the text to the right number of placeholder tokens. Needs
    num_additional_image_tokens=1 (as in the llava-hf processor_config.json files): with the default 0 and
    strategy "default" it under-counts by one. Not available for OneVision (LlavaOnevisionProcessor insists on a
    video processor, which needs torchvision); use example_inputs() there.
    """
    from transformers import AutoConfig, LlavaNextProcessor, LlavaProcessor

    cfg = AutoConfig.from_pretrained(str(path))
    cls = {"llava": LlavaProcessor, "llava_next": LlavaNextProcessor}.get(cfg.model_type)
    if cls is None:
        raise NotImplementedError(f"no combined processor for model_type {cfg.model_type!r} here")
    return cls(
        image_processor=load_processor(path), tokenizer=load_tokenizer(path), patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1,
        image_token="<image>",
    )


# ----------------------------------------------------------------------------------------------------
# build / load
# ----------------------------------------------------------------------------------------------------


def make_model(name: str, seed: int = 0):
    """Construct the tiny transformers model in memory (fp32, eval, randomized deterministically)."""
    config = make_config(name)
    torch.manual_seed(seed)  # constructor init is overwritten anyway; keeps it reproducible regardless
    model = _model_class(config.model_type)(config).to(torch.float32)
    randomize_(model, seed)
    return model.eval()


def build(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build tiny random checkpoint `name` into `out_dir` (created); returns `out_dir`.

    Writes config.json, generation_config.json, model.safetensors (save_pretrained), preprocessor_config.json
    (pil-backend image processor), tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(name, seed)
    model.save_pretrained(str(out_dir))
    make_processor(name).save_pretrained(str(out_dir))
    _write_tokenizer(name, out_dir, _ORIGINAL[name]["max_len"])
    return out_dir


def load_reference(path: Path, attn_implementation: str = "eager"):
    """Load a folder written by build() with the matching transformers class (fp32, eval, eager attention)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    cls = _model_class(config.model_type)
    model = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


def saved_keys(path: Path) -> list[str]:
    """Tensor names in a folder's safetensors / bin files (all shards)."""
    keys: list[str] = []
    path = Path(path)
    for f in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            keys.extend(fh.keys())
    for f in sorted(path.glob("*.bin")):
        keys.extend(torch.load(str(f), map_location="cpu", weights_only=True).keys())
    return sorted(keys)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------


def image_token_count(model, inputs: dict) -> int:
    """How many <image> placeholder tokens the reference model wants for `inputs` (processor output).

    Asks the model itself: runs its get_image_features and counts the rows it would scatter.
    """
    cfg = model.config
    kwargs = dict(
        pixel_values=inputs["pixel_values"].to(torch.float32),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    if cfg.model_type != "llava":
        kwargs["image_sizes"] = inputs["image_sizes"]
    if cfg.model_type == "llava_onevision":
        kwargs["vision_aspect_ratio"] = cfg.vision_aspect_ratio
        kwargs["batch_num_images"] = inputs.get("batch_num_images")
    with torch.no_grad():
        out = model.model.get_image_features(**kwargs)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        return sum(f.shape[0] for f in feats)
    return feats.shape[0] * feats.shape[1] if feats.dim() == 3 else feats.shape[0]


def example_inputs(name: str, model, processor, image, prompt_ids_before=(5, 6), prompt_ids_after=(7, 8, 9)) -> dict:
    """Processor output for one PIL `image` plus input_ids/attention_mask with the right <image> count.

    Sequence: [BOS for llama-family] + prompt_ids_before + <image> * n + prompt_ids_after (batch of 1).
    """
    inputs = dict(processor(images=image, return_tensors="pt"))
    n = image_token_count(model, inputs)
    bos = [LLAMA_TOKENS["<s>"]] if _family(name) in ("llama", "mistral") else []
    ids = bos + list(prompt_ids_before) + [IMAGE_TOKEN_ID[name]] * n + list(prompt_ids_after)
    inputs["input_ids"] = torch.tensor([ids], dtype=torch.long)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["num_image_tokens"] = n
    return inputs
