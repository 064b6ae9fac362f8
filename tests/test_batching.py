"""Continuous batching (batching.py) below the server: a sequence's text as it streams, and the batch cache's rows.
The scheduler's answers against infer.py's, alone and sixteen at a time, are tests/test_serve.py's."""

import random

import pytest
import torch
from tiny_checkpoints import make_tokenizer

from batching import BatchCache, Scheduler, Sequence
from convert import load_pretrained
from model import KVCache


def test_a_byte_fallback_tokenizer_streams_whole_characters():
    """SentencePiece's byte fallback (LLaVA-1.5, 1.6-Vicuna/Mistral/34B) decodes each byte of an unfinished
    character to its own U+FFFD: the stream holds them all back and loses no text after them."""
    tokenizer = make_tokenizer("llava15_llama")
    answer = "hi \U0001F600 there, \u4e2d and more"
    ids = tokenizer.encode(answer, add_special_tokens=False).ids
    assert len(ids) > len(answer.split()) + 4  # the emoji and the CJK character are several byte tokens each
    deltas = []
    seq = Sequence([1], [], max_new=len(ids), post=lambda event: deltas.append(event))
    scheduler = type("Bare", (), {"tokenizer": tokenizer, "stop_ids": set()})()  # accept() reads only these
    scheduler.new_text = Scheduler.new_text.__get__(scheduler)
    finished = [Scheduler.accept(scheduler, seq, t) for t in ids]
    assert finished == [False] * (len(ids) - 1) + [True]
    text = "".join(event[1] for event in deltas if event[0] == "delta")
    assert "\ufffd" not in text and text == answer and deltas[-1][1] == "length"


def test_the_batch_cache_grows_its_rows_with_the_running_sequences(tiny):
    """Rows double as sequences join (up to --max-batch) and go when the last leaves; a row's keys survive both."""
    cfg = load_pretrained(str(tiny("onevision_qwen2")))[0].cfg.text
    cache = BatchCache(cfg, max_rows=5, dtype=torch.float32, device=torch.device("cpu"))
    singles = []
    for i, length in enumerate([3, 300, 7, 2, 9]):
        single = KVCache(cfg, 1, length, torch.float32, torch.device("cpu"))
        single.k.normal_(), single.v.normal_()
        single.length = length
        cache.add(single)
        singles.append(single)
        assert cache.k.shape[1] == [1, 2, 4, 4, 5][i] and cache.k.shape[3] == (256 if i == 0 else 512)
    assert torch.equal(cache.k[:, 1, :, :300], singles[1].k[:, 0, :, :300])
    cache.remove(1)  # the last row moves into its place
    assert torch.equal(cache.k[:, 1, :, :9], singles[4].k[:, 0, :, :9]) and cache.lengths.tolist() == [3, 9, 7, 2]
    for _ in range(4):
        cache.remove(0)
    assert cache.k.shape[1] == 0 and cache.k.shape[3] == 0


# byte-level BPE (Qwen), SentencePiece with byte fallback (Vicuna)
@pytest.mark.parametrize("name", ["onevision_qwen2", "llava15_llama"])
def test_the_streamed_text_is_one_decode_of_the_whole_answer(name):
    """The scheduler decodes only each answer's newest tokens; what it posts, joined, is the whole answer decoded at
    once (infer.py's answer), and every post is a prefix of it, on random ids (byte tokens and broken characters
    included)."""
    tokenizer = make_tokenizer(name)
    rng = random.Random(0)
    scheduler = type("Bare", (), {"tokenizer": tokenizer, "stop_ids": set()})()
    scheduler.new_text = Scheduler.new_text.__get__(scheduler)
    for trial in range(300):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randint(1, 40))]
        deltas = []
        seq = Sequence([1], [], max_new=len(ids), post=lambda event: deltas.append(event))
        for t in ids:
            Scheduler.accept(scheduler, seq, t)
        posted = [event[1] for event in deltas if event[0] == "delta"]
        whole = tokenizer.decode(ids).strip()
        assert "".join(posted) == whole, (trial, ids)
        assert all(whole.startswith("".join(posted[:i])) for i in range(len(posted)))
