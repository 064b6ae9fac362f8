"""Conversation templates and tokenisation with image placeholders.

    messages [(role, text), ...]  --render_prompt-->  one string in the model's chat format, `<image>` where images go
    string + images               --tokenize------->  token ids with each `<image>` replaced by that image's run of
                                                      IMAGE_TOKEN (its exact feature count, anyres.num_image_tokens)

The strings are exactly the ones the released models were trained with (facts §7.1); the same table serves
inference and training, so the two never format a conversation differently.
"""

from dataclasses import dataclass

from model import IMAGE_TOKEN


@dataclass(frozen=True)
class Template:
    system: str  # everything before the first user turn
    user: str  # one user turn; {} is the message
    assistant: str  # one finished assistant turn; {} is the answer
    generation: str  # what follows the last user turn when the model is to answer
    stop: tuple[str, ...]  # token strings that end an answer
    strip: bool = False  # the template trims each message (Llama-3's chat template does)


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
H3 = "<|start_header_id|>{}<|end_header_id|>\n\n"  # a Llama-3 message header

TEMPLATES = {
    # LLaVA-1.5 training and evaluation ("v1" in the original scripts): "SYS USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": Template(VICUNA_SYSTEM + " ", "USER: {} ", "ASSISTANT: {}</s>", "ASSISTANT:", ("</s>",)),
    # the same with "human" for "user" in the system sentence; the LLaVA CLI's pick for "v1" model names
    "llava_v1": Template(LLAVA_SYSTEM + " ", "USER: {} ", "ASSISTANT: {}</s>", "ASSISTANT:", ("</s>",)),
    # LLaVA-1.6 Mistral: "[INST] q [/INST] a </s>[INST] ..."; the tokenizer adds <s>
    "mistral_instruct": Template("", "[INST] {} [/INST]", " {} </s>", "", ("</s>",)),
    # LLaVA-1.6 34B (Nous-Hermes-2-Yi): ChatML with no newline after <|im_end|>
    "chatml_direct": Template("<|im_start|>system\nAnswer the questions.<|im_end|>", "<|im_start|>user\n{}<|im_end|>",
                              "<|im_start|>assistant\n{}<|im_end|>", "<|im_start|>assistant\n", ("<|im_end|>",)),
    # LLaVA-NeXT Llama-3-8B: the Llama-3 chat format; stops on <|eot_id|> (128009) and <|end_of_text|> (128001)
    "llava_llama_3": Template("<|begin_of_text|>" + H3.format("system") + LLAMA3_SYSTEM + "<|eot_id|>",
                              H3.format("user") + "{}<|eot_id|>", H3.format("assistant") + "{}<|eot_id|>",
                              H3.format("assistant"), ("<|eot_id|>", "<|end_of_text|>"), strip=True),
    # NeXT-72B/110B, Interleave, OneVision (qwen_2 is the same object in the original code)
    "qwen_1_5": Template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
                         "<|im_start|>assistant\n{}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",)),
    # stage-1 alignment: the image, then its caption; the user's words are dropped
    "plain": Template("", "{}", "{}\n", "", ("\n",)),
}
TEMPLATES["qwen_2"] = TEMPLATES["qwen_1_5"]


def render_prompt(template: str, messages, add_generation_prompt: bool = True) -> str:
    """messages: [("user" | "assistant", text), ...] starting with a user turn -> the prompt string."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    t = TEMPLATES[template]
    out = [t.system]
    for role, text in messages:
        text = text.strip() if t.strip else text
        if template == "plain" and role == "user":
            text = "<image>" * text.count("<image>")  # plain keeps only the image
        out.append((t.user if role == "user" else t.assistant).format(text))
    if add_generation_prompt:
        out.append(t.generation)
    return "".join(out)


def stop_token_ids(tokenizer, template: str, extra=()) -> set[int]:
    """Ids that end generation: the template's end-of-turn tokens and the checkpoint's own eos ids."""
    ids = {tokenizer.token_to_id(s) for s in TEMPLATES[template].stop if tokenizer.token_to_id(s) is not None}
    return ids | set(extra)


def tokenize(tokenizer, text: str, image_tokens=()) -> list[int]:
    """Token ids of `text` with each `<image>` replaced by `image_tokens[i]` copies of IMAGE_TOKEN.

    Like the original `tokenizer_image_token`, each piece between placeholders is tokenised on its own and only the
    first keeps the tokenizer's BOS. A BOS the text already spells out (Llama-3's template) is not doubled.
    """
    pieces = text.split("<image>")
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"the prompt has {len(pieces) - 1} <image> placeholders but {len(image_tokens)} images were given")
    ids = tokenizer.encode(pieces[0], add_special_tokens=True).ids
    if len(ids) >= 2 and ids[0] == ids[1] and tokenizer.id_to_token(ids[0]) in ("<|begin_of_text|>", "<s>"):
        ids = ids[1:]
    for count, piece in zip(image_tokens, pieces[1:]):
        ids += [IMAGE_TOKEN] * count + tokenizer.encode(piece, add_special_tokens=False).ids
    return ids
