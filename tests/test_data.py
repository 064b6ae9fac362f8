"""Conversation templates and tokenisation: the exact strings the released models were trained with, the original
code's own templates as the oracle where it has them, and placeholders expanded to the image's token count."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from data import TEMPLATES, render_prompt, stop_token_ids, tokenize
from model import IMAGE_TOKEN

TWO_ROUNDS = [("user", "<image>\nWhat is this?"), ("assistant", "A cat."), ("user", "And its colour?")]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct"])
def test_templates_equal_the_original_llava_conversation_code(original_llava, name):
    conv = original_llava.conversation.conv_templates[name].copy()
    for role, text in TWO_ROUNDS:
        conv.append_message(conv.roles[0 if role == "user" else 1], text)
    conv.append_message(conv.roles[1], None)
    assert render_prompt(name, TWO_ROUNDS) == conv.get_prompt()


def test_qwen_1_5_string():  # NeXT's conv_qwen (facts §7.1)
    assert render_prompt("qwen_1_5", TWO_ROUNDS) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n")


def test_llava_llama_3_string_trims_messages():
    prompt = render_prompt("llava_llama_3", [("user", " <image>\nWhat is this? ")])
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + TEMPLATES["llava_llama_3"].system.split("\n\n")[1]
        + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_plain_keeps_only_the_image_and_the_caption():
    assert render_prompt("plain", [("user", "<image>\nDescribe."), ("assistant", "A red square.")], False) == "<image>A red square.\n"


def word_tokenizer(bos: str):
    """A word-level tokenizer whose post-processor adds `bos`, as Llama-family tokenizer.json files do."""
    vocab = {w: i for i, w in enumerate(["[UNK]", bos, "<|eot_id|>", "<|end_of_text|>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([bos, "<|eot_id|>", "<|end_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    return tok


def test_placeholders_expand_to_the_image_token_counts_and_bos_appears_once():
    tok = word_tokenizer("<s>")
    ids = tokenize(tok, "hello <image> world <image> hello", [3, 2])
    assert ids == [1, 4] + [IMAGE_TOKEN] * 3 + [5] + [IMAGE_TOKEN] * 2 + [4]


def test_a_bos_spelled_in_the_template_is_not_doubled():
    # the Llama-3 template text starts with <|begin_of_text|>, and the tokenizer adds one as well
    tok = word_tokenizer("<|begin_of_text|>")
    assert tokenize(tok, "<|begin_of_text|> hello") == [1, 4]


def test_placeholder_count_must_match_the_images():
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        tokenize(word_tokenizer("<s>"), "<image> <image>", [5])


def test_llama_3_stops_on_eot_and_end_of_text():
    assert stop_token_ids(word_tokenizer("<|begin_of_text|>"), "llava_llama_3") == {2, 3}
