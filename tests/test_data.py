"""Conversation templates, tokenisation and training samples: the exact strings the released models were trained
with (the original code's own templates as the oracle where it has them), placeholders expanded to the image's token
count, labels on the answers only, and every kind of bad sample reported rather than trained on."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from data import (
    IGNORE_INDEX,
    TEMPLATES,
    SampleError,
    SupervisedDataset,
    render_prompt,
    stop_token_ids,
    tokenize,
    tokenize_conversation,
)
from model import IMAGE_TOKEN

TWO_ROUNDS = [("user", "<image>\nWhat is this?"), ("assistant", "A cat."), ("user", "And its colour?")]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct"])
def test_templates_equal_the_original_llava_conversation_code(original_llava, name):
    conv = original_llava.conversation.conv_templates[name].copy()
    for role, text in TWO_ROUNDS:
        conv.append_message(conv.roles[0 if role == "user" else 1], text)
    conv.append_message(conv.roles[1], None)
    assert render_prompt(name, TWO_ROUNDS) == conv.get_prompt()


def test_qwen_1_5_string():  # NeXT's conv_qwen
    assert render_prompt("qwen_1_5", TWO_ROUNDS) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n")


def test_llava_llama_3_string_trims_messages():
    prompt = render_prompt("llava_llama_3", [("user", " <image>\nWhat is this? ")])
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + TEMPLATES["llava_llama_3"].system.split("\n\n")[1]
        + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_plain_keeps_only_the_image_and_the_caption():
    assert (render_prompt("plain", [("user", "<image>\nDescribe."), ("assistant", "A red square.")], False)
            == "<image>A red square.\n")


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


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation against the two oracles, on the tiny checkpoints' real tokenizer.json files: SentencePiece-style
# (Metaspace, like the llava-hf LLaVA-1.5 / 1.6 Llama and Mistral repos) and byte-level (Qwen2, and a Llama-family one)

# (checkpoint, template, user turn): one image in front, several images, images mid-text and back to back
PROMPTS = [
    ("llava15_llama", "vicuna_v1", "<image>\nWhat is shown in this image?"),
    ("llava15_llama", "vicuna_v1", "What is <image> and what is<image>?"),
    ("next_mistral", "mistral_instruct", "<image>\nDescribe the picture."),
    ("next_mistral", "mistral_instruct", "Left <image>\nright <image><image> the cat"),
    ("next_mistral", "plain", "<image>\nDescribe."),
    ("next_llama", "llava_v1", "<image>\nWhat is shown in this image?"),
    ("next_llama", "llava_v1", "Compare <image> with<image>\nnow"),
    ("next_qwen2", "qwen_1_5", "<image>\nWhat is in the image?"),
    ("next_qwen2", "qwen_1_5", "one <image>two<image> three"),
]


@pytest.fixture(scope="module")
def tiny_parts(tiny):
    from convert import load_pretrained
    from chat_template import load_tokenizer

    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny(name)
            model, _ = load_pretrained(str(folder), compat="transformers")
            cache[name] = folder, model.cfg, load_tokenizer(folder, str(folder))
        return cache[name]

    return get


@pytest.mark.parametrize("name, template, text", PROMPTS)
def test_transformers_compat_gives_the_processor_ids(tiny_parts, name, template, text):
    """compat="transformers": exactly the input_ids of transformers' own LlavaProcessor / LlavaNextProcessor on the
    same prompt string and images, images expanded to the same counts."""
    from conftest import photo

    import tiny_checkpoints as tc
    from anyres import process_images

    folder, cfg, tok = tiny_parts(name)
    prompt = render_prompt(template, [("user", text)])
    images = [photo(45, 30, seed=1), photo(30, 70, seed=2), photo(40, 40, seed=3)][: prompt.count("<image>")]
    theirs = tc.load_full_processor(folder)(images=images, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    counts = [im.num_tokens for im in process_images(images, cfg)]
    ours = tokenize(tok, prompt, counts, compat="transformers")
    assert [tc.IMAGE_TOKEN_ID[name] if t == IMAGE_TOKEN else t for t in ours] == theirs


@pytest.mark.parametrize("name, template, text", PROMPTS)
def test_original_compat_gives_tokenizer_image_token_ids(original_llava, tiny_parts, name, template, text):
    """compat="original": exactly the original `tokenizer_image_token` (llava/mm_utils.py) with a transformers
    tokenizer read from the same tokenizer.json. With SentencePiece-style tokenizers it tokenises each piece after
    an image on its own and so gains one word-start "▁" per image whose text does not start with a space; with
    byte-level ones both readings agree."""
    from transformers import AutoTokenizer, LlamaTokenizerFast

    import tiny_checkpoints as tc

    folder, _, tok = tiny_parts(name)
    prompt = render_prompt(template, [("user", text)])
    # the class the original code loads for Llama-family checkpoints; the byte-level files name their own class
    hf_tok = (LlamaTokenizerFast if name in tc.METASPACE else AutoTokenizer).from_pretrained(str(folder))
    theirs = original_llava.mm_utils.tokenizer_image_token(prompt, hf_tok)
    n = prompt.count("<image>")
    ours = tokenize(tok, prompt, [1] * n, compat="original")
    assert ours == theirs
    pieces_without_space = sum(piece[:1] not in ("", " ") for piece in prompt.split("<image>")[1:])
    extra = pieces_without_space if name in tc.METASPACE else 0
    assert len(ours) == len(tokenize(tok, prompt, [1] * n, compat="transformers")) + extra
    if name in tc.METASPACE and "<image>\n" in prompt:  # the word-start piece the original puts after the image
        after = ours.index(IMAGE_TOKEN) + 1
        assert tok.id_to_token(ours[after]) == "▁" and tok.id_to_token(ours[after + 1]) == "<0x0A>"


def test_transformers_compat_without_an_image_token_in_the_tokenizer():
    """The original checkpoints' tokenizers have no <image> token: compat="transformers" reads them as the llava-hf
    conversion (the same tokenizer plus <image>) would, and leaves the tokenizer itself unchanged."""
    import json

    import tiny_checkpoints as tc

    full = tc.make_tokenizer("next_mistral")
    spec = json.loads(full.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<image>"]
    del spec["model"]["vocab"]["<image>"]
    bare = Tokenizer.from_str(json.dumps(spec))
    prompt = render_prompt("mistral_instruct", [("user", "<image>\nwhat is<image>it")])
    assert tokenize(bare, prompt, [2, 3], "transformers") == tokenize(full, prompt, [2, 3], "transformers")
    assert tokenize(bare, prompt, [2, 3], "original") == tokenize(full, prompt, [2, 3], "original")
    assert bare.token_to_id("<image>") is None


@pytest.mark.parametrize("compat", ["original", "transformers"])
@pytest.mark.parametrize("name, template", [("llava15_llama", "vicuna_v1"), ("next_mistral", "mistral_instruct")])
def test_sentencepiece_labels_spell_the_answers(tiny_parts, name, template, compat):
    """Training labels with a Metaspace tokenizer: the answers and their </s>, nothing else, in both readings, and
    the ids are the inference tokenisation of the same turns."""
    _, _, tok = tiny_parts(name)
    chat = [("user", "<image>\nwhat is it"), ("assistant", "a cat"), ("user", "and this"), ("assistant", "the dog")]
    ids, labels = tokenize_conversation(tok, template, chat, [3], compat)
    answers = tok.decode([l for l in labels if l != IGNORE_INDEX], skip_special_tokens=False)
    assert answers.replace(" ", "") == "acat</s>thedog</s>"
    assert ids == tokenize(tok, render_prompt(template, chat, add_generation_prompt=False), [3], compat)


# ----------------------------------------------------------------------------------------------------------------
# Label masking: what a model learns from each template

SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
CHAT = [("user", "<image>\nwhat is it"), ("assistant", "a cat"), ("user", "and this"), ("assistant", "a dog")]


def chat_tokenizer(bos=None):
    """Word-level: every whitespace-separated word and every template marker is one token, so labels read as words."""
    words = sorted({w for t in TEMPLATES.values() for s in (t.system, t.user, t.assistant, t.generation)
                    for w in s.split()}
                   | {"what", "is", "it", "a", "cat", "and", "this", "dog", "left", "right", "USER:", "ASSISTANT:"})
    vocab = {w: i for i, w in enumerate(["[UNK]", *SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return tok


def learned(tok, ids, labels):
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    return [tok.id_to_token(l) for l in labels if l != IGNORE_INDEX]


def test_mistral_masking_token_by_token():
    tok = chat_tokenizer(bos="<s>")
    ids, labels = tokenize_conversation(tok, "mistral_instruct", CHAT, [3])
    rows = [(tok.id_to_token(i) if i >= 0 else "IMG", l != IGNORE_INDEX) for i, l in zip(ids, labels)]
    assert rows == [("<s>", False), ("[INST]", False), ("IMG", False), ("IMG", False), ("IMG", False), ("what", False),
                    ("is", False), ("it", False), ("[/INST]", False), ("a", True), ("cat", True), ("</s>", True),
                    ("[INST]", False), ("and", False), ("this", False), ("[/INST]", False), ("a", True), ("dog", True),
                    ("</s>", True)]


@pytest.mark.parametrize("template, bos, answers", [
    ("vicuna_v1", "<s>", ["a", "cat", "</s>", "a", "dog", "</s>"]),
    ("llava_v1", "<s>", ["a", "cat", "</s>", "a", "dog", "</s>"]),
    ("chatml_direct", None, ["a", "cat", "<|im_end|>", "a", "dog", "<|im_end|>"]),
    ("qwen_1_5", None, ["a", "cat", "<|im_end|>", "a", "dog", "<|im_end|>"]),  # not the role headers, not the newlines
    ("llava_llama_3", "<|begin_of_text|>", ["a", "cat", "<|eot_id|>", "a", "dog", "<|eot_id|>"]),
])
def test_only_answers_and_their_end_tokens_are_learned(template, bos, answers):
    tok = chat_tokenizer(bos)
    ids, labels = tokenize_conversation(tok, template, CHAT, [4])
    assert learned(tok, ids, labels) == answers
    # the ids are exactly the inference tokenisation of the same turns
    assert ids == tokenize(tok, render_prompt(template, CHAT, add_generation_prompt=False), [4])
    assert ids.count(IMAGE_TOKEN) == 4
    if bos:  # exactly one BOS, also where the template spells one out (Llama-3)
        assert tok.id_to_token(ids[0]) == bos and ids.count(ids[0]) == 1


def test_plain_learns_the_caption_only():
    tok = chat_tokenizer()
    ids, labels = tokenize_conversation(tok, "plain", [("user", "<image>\ndescribe"), ("assistant", "a cat")], [2])
    assert ids[:2] == [IMAGE_TOKEN] * 2 and learned(tok, ids, labels) == ["a", "cat"]


def test_multi_image_positions_are_never_learned():
    tok = chat_tokenizer()
    chat = [("user", "<image> left <image> right"), ("assistant", "a dog")]
    ids, labels = tokenize_conversation(tok, "qwen_1_5", chat, [2, 3])
    assert ([i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
            == [i for i, t in enumerate(ids) if t == IMAGE_TOKEN and labels[i] == IGNORE_INDEX])
    assert ids.count(IMAGE_TOKEN) == 5 and learned(tok, ids, labels) == ["a", "dog", "<|im_end|>"]


def test_a_mismatch_between_text_and_tokens_is_an_error_not_a_zero_loss():
    tok = chat_tokenizer()
    with pytest.raises(SampleError, match="tokenization mismatch"):
        tokenize_conversation(tok, "qwen_1_5", [("user", "what"), ("assistant", "a zebra")])  # "zebra" is [UNK]


# ----------------------------------------------------------------------------------------------------------------
# Bad samples: each has its own counter and message; none crashes a run


@pytest.fixture
def bad_records(tmp_path):
    from conftest import photo

    photo(40, 30).save(tmp_path / "ok.png")
    (tmp_path / "truncated.jpg").write_bytes((lambda b: b[: len(b) // 2])(_jpeg_bytes()))

    def chat(text="<image>\nwhat is it"):
        return [{"from": "human", "value": text}, {"from": "gpt", "value": "a cat"}]

    return tmp_path, [
        {"id": "good", "image": "ok.png", "conversations": chat()},
        {"id": "missing", "image": "nope.png", "conversations": chat()},
        {"id": "truncated", "image": "truncated.jpg", "conversations": chat()},
        {"id": "count", "image": ["ok.png", "ok.png"], "conversations": chat()},
        {"id": "gpt-first", "image": "ok.png", "conversations": chat()[::-1]},
        {"id": "empty", "image": "ok.png", "conversations": []},
        # two images stay where the text puts them; the second falls beyond --max-len
        {"id": "long", "image": ["ok.png", "ok.png"],
         "conversations": chat("<image> " + "what is it " * 100 + "<image>")},
    ]


def _jpeg_bytes():
    import io

    from conftest import photo

    buf = io.BytesIO()
    photo(64, 64).save(buf, format="JPEG")
    return buf.getvalue()


def test_each_bad_sample_gets_its_own_error(bad_records, tiny):
    from convert import load_pretrained

    folder, records = bad_records
    model, _ = load_pretrained(str(tiny("next_qwen2")))
    dataset = SupervisedDataset(records, folder, chat_tokenizer(), "qwen_1_5", model.cfg, max_len=300)
    assert len(dataset[0]["input_ids"]) < 300
    kinds = {dataset[i]["id"]: dataset[i].get("error") for i in range(len(records))}
    assert kinds == {"good": None, "missing": "missing image", "truncated": "unreadable image",
                     "count": "image count mismatch", "gpt-first": "first turn not human",
                     "empty": "empty conversation", "long": "truncated through an image"}
    assert "nope.png" in dataset[1]["detail"] and "truncated.jpg" in dataset[2]["detail"]


def test_a_run_counts_bad_samples_and_stops_when_there_are_too_many(bad_records, tiny, tmp_path, capsys):
    import json

    from train import TrainConfig, train

    folder, records = bad_records
    data = folder / "data.json"
    data.write_text(json.dumps([records[0]] * 20 + records[1:3]))  # 2 bad samples in 22
    # max_bad_fraction 0.1 allows up to 0.1 * 22 + 3 standard deviations = 6.4 bad samples in 22
    cfg = TrainConfig(model=str(tiny("next_qwen2")), data=str(data), image_folder=str(folder),
                      output_dir=str(tmp_path / "run"), global_batch_size=22, micro_batch_size=11, max_steps=1,
                      max_len=512, save_every=10, group_by_modality_length=False, max_bad_fraction=0.1)
    train(cfg)
    err = capsys.readouterr().err
    assert "skipping sample 'missing'" in err and "skipping sample 'truncated'" in err
    assert "skipped 2 unusable samples: {'missing image': 1, 'unreadable image': 1}" in err
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["bad_samples"] == 2
    data.write_text(json.dumps([records[0]] * 80 + records[1:6] * 4))  # 20 bad of 100
    cfg.global_batch_size, cfg.micro_batch_size, cfg.output_dir = 100, 50, str(tmp_path / "run2")
    cfg.max_bad_fraction = 0.05  # allows 5 + 3 * 2.18 = 11.5 in 100
    with pytest.raises(SystemExit, match=r"20 of 100 samples could not be used .* more than --max-bad-fraction 0.05"):
        train(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Several images and video


def test_image_placement_interleaved_front_and_mixed():
    from data import place_images

    turns = [("user", "Look at <image> and then <image>. Same?"), ("assistant", "No.")]
    assert place_images(turns, "interleaved") == turns
    assert (place_images(turns, "front")
            == [("user", "<image>\n<image>\nLook at  and then . Same?"), ("assistant", "No.")])
    # mixed: drawn per sample id, the same every time, and both formats occur
    drawn = [place_images(turns, "mixed", key=i) for i in range(40)]
    assert drawn == [place_images(turns, "mixed", key=i) for i in range(40)]
    assert 10 < sum(d == turns for d in drawn) < 30
    # a lone image always leads the first turn, whatever the placement
    single = [("user", "What is <image>?"), ("assistant", "A cat.")]
    assert place_images(single, "interleaved") == [("user", "<image>\nWhat is ?"), ("assistant", "A cat.")]


def test_uniform_frame_sampling_spans_the_clip():
    from data import uniform_indices

    assert uniform_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]  # np.linspace(0, 99, 8, dtype=int)
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4]


@pytest.fixture
def clips(tmp_path):
    from conftest import photo

    frames = [photo(32, 24, seed=s) for s in range(10)]
    frames[0].save(tmp_path / "clip.webp", save_all=True, append_images=frames[1:], lossless=True)
    (tmp_path / "frames").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "frames" / f"{i:03d}.png")
    return tmp_path, frames


def test_videos_read_from_animated_webp_and_frame_folders(clips):
    import numpy as np

    from data import load_video

    folder, frames = clips
    for source in ("clip.webp", "frames"):
        got = load_video(folder / source, 4)  # frames 0, 3, 6, 9
        assert len(got) == 4
        assert all(np.array_equal(np.asarray(g), np.asarray(frames[i])) for g, i in zip(got, [0, 3, 6, 9])), source
    with pytest.raises(SampleError, match="missing video"):
        load_video(folder / "nope.webp", 4)


def test_m4_instruct_and_llava_video_records_load_unchanged(clips, tiny):
    """The official multi-image (M4-Instruct: "image" a list, <image> in the text) and video (LLaVA-Video-178K:
    "video" a path, one <image>) records; tokens per image / frame as the tiny OneVision counts them."""
    from conftest import photo

    from convert import load_pretrained

    folder, _ = clips
    photo(40, 20, seed=1).save(folder / "a.png")
    photo(20, 40, seed=2).save(folder / "b.png")
    records = [
        {"id": "m4", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "this <image> and this <image> what is it"}, {"from": "gpt", "value": "a dog"}]},
        {"id": "video", "video": "clip.webp", "data_source": "demo", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]},
        {"id": "frames", "video": "frames", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]},
        {"id": "two", "video": "clip.webp", "conversations": [
            {"from": "human", "value": "<image> <image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]},
    ]
    model, _ = load_pretrained(str(tiny("onevision_qwen2")))
    dataset = SupervisedDataset(records, folder, chat_tokenizer(), "qwen_1_5", model.cfg, max_len=600,
                                video_folder=folder, num_frames=4)
    m4, video, frames, two = (dataset[i] for i in range(4))
    assert [im.num_tokens for im in m4["images"]] == [82, 82] and m4["input_ids"].count(IMAGE_TOKEN) == 164
    assert video["images"][0].video and video["input_ids"].count(IMAGE_TOKEN) == 4 * 25 + 1
    assert frames["input_ids"] == video["input_ids"]
    assert two["error"] == "image count mismatch"


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv"])  # mp4 states its frame count, Matroska does not
def test_pyav_videos_keep_only_the_sampled_frames(tmp_path, monkeypatch, name):
    """With PyAV installed (optional), a clip gives the uniformly sampled frames of a full decode, and only those
    become images (a container that states no length is counted first: keeping every frame of a long clip would
    hold ~100 GB)."""
    av = pytest.importorskip("av", reason="PyAV is optional; without it load_video says to install it")
    import numpy as np
    from conftest import photo

    from data import load_video

    with av.open(str(tmp_path / name), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            for packet in stream.encode(av.VideoFrame.from_image(photo(64, 48, seed=i))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(tmp_path / name)) as container:
        assert container.streams.video[0].frames == (20 if name.endswith("mp4") else 0)
        every = [np.asarray(f.to_image().convert("RGB")) for f in container.decode(video=0)]

    made, real_open = [], av.open

    class Counted:  # a container whose decoded frames count the images made of them
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def __getattr__(self, key):
            return getattr(self.inner, key)

        def decode(self, *args):
            for frame in self.inner.decode(*args):
                yield type("Frame", (), {"to_image": lambda self, f=frame: made.append(1) or f.to_image()})()

    monkeypatch.setattr(av, "open", Counted)
    got = load_video(tmp_path / name, 5)
    assert len(every) == 20 and len(got) == 5 and len(made) == 5
    assert all(np.array_equal(np.asarray(g), every[i]) for g, i in zip(got, [0, 4, 9, 14, 19]))
