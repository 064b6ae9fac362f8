"""Conversation templates, tokenisation with image placeholders, and training samples.

    messages [(role, text), ...]  --render_conversation-->  one string in the model's chat format, `<image>` where
                                                            images go, and the character spans of the answers
    string + images               --encode / tokenize---->  token ids with each `<image>` replaced by that image's run
                                                            of IMAGE_TOKEN (its exact feature count,
                                                            anyres.num_image_tokens)
    LLaVA JSON record             --SupervisedDataset---->  {input_ids, labels (answers only, -100 elsewhere), images}
                                  (one image, several interleaved or in front, or a video's sampled frames)
    samples                       --collate / global_batches-->  right-padded batches in a (seed, epoch)-fixed order

The strings are exactly the ones the released models were trained with (the original `llava/conversation.py`);
one table serves inference and training, and labels are read off the same tokenisation inference uses, so the two
never see different ids.
"""

import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anyres import MAX_IMAGE_PIXELS, ImageTooLarge, process_images, process_video
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
    "qwen_1_5": Template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                         "<|im_start|>user\n{}<|im_end|>\n",
                         "<|im_start|>assistant\n{}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",)),
    # stage-1 alignment: the image, then its caption; the user's words are dropped
    "plain": Template("", "{}", "{}\n", "", ("\n",)),
}
TEMPLATES["qwen_2"] = TEMPLATES["qwen_1_5"]


def render_conversation(template: str, messages, add_generation_prompt: bool = False):
    """messages [("user" | "assistant", text), ...], starting with a user turn -> (text, targets).

    `targets` are the character spans a model learns from: each answer and the end-of-turn token that closes it
    (`</s>`, `<|im_end|>`, ...). The header before an answer and the newline after its end token are not targets.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    t = TEMPLATES[template]
    out, targets = t.system, []
    for role, text in messages:
        text = text.strip() if t.strip else text
        if role == "user":
            # plain: image only
            out += t.user.format("<image>" * text.count("<image>") if template == "plain" else text)
            continue
        head, tail = t.assistant.split("{}")
        stop_end = min((tail.find(s) + len(s) for s in t.stop if s in tail), default=0)
        start = len(out) + len(head)
        targets.append((start, start + len(text) + stop_end))
        out += head + text + tail
    if add_generation_prompt:
        out += t.generation
    return out, targets


def render_prompt(template: str, messages, add_generation_prompt: bool = True) -> str:
    """The prompt string for inference: the conversation so far, then the header the model answers after."""
    return render_conversation(template, messages, add_generation_prompt)[0]


SYSTEM_SENTENCES = (VICUNA_SYSTEM, LLAVA_SYSTEM, LLAMA3_SYSTEM, "Answer the questions.", "You are a helpful assistant.")


def system_slot(template: str) -> tuple[str, str] | None:
    """(before, after) the default system sentence in a template's opening: a system message of the user's goes
    between them. None for templates without a system sentence (mistral_instruct, plain)."""
    system = TEMPLATES[template].system
    for sentence in SYSTEM_SENTENCES:
        if sentence in system:
            before, _, after = system.partition(sentence)
            return before, after
    return None


def stop_token_ids(tokenizer, template: str, extra=()) -> set[int]:
    """Ids that end generation: the template's end-of-turn tokens and the checkpoint's own eos ids."""
    ids = {tokenizer.token_to_id(s) for s in TEMPLATES[template].stop if tokenizer.token_to_id(s) is not None}
    return ids | set(extra)


def encode(tokenizer, text: str, image_tokens=(), compat: str = "original"):
    """(ids, ends): token ids of `text` with each `<image>` replaced by `image_tokens[i]` copies of IMAGE_TOKEN, and
    each token's end offset in `text` (None for image positions and the tokenizer's own BOS).

    The two readings differ for SentencePiece-style tokenizers (a Metaspace pre-tokenizer, as the LLaVA-1.5/1.6
    Vicuna, Mistral and 34B tokenizers are), which put a word-start "▁" before a text that does not start with one:
      "original"      each piece between placeholders is tokenised on its own, as the original
                      `tokenizer_image_token` does, so a piece after an image gains that "▁" token ("<image>\nWhat"
                      -> IMG ▁ <0x0A> What); only the first piece keeps the tokenizer's BOS
      "transformers"  the whole text is tokenised at once with `<image>` an added special token, as the llava-hf
                      processor does: only the text's very start gets the "▁" (-> IMG <0x0A> What)
    Byte-level tokenizers (Qwen, Llama-3) give the same ids either way. A BOS the text already spells out
    (Llama-3's template) is not doubled.
    """
    pieces = text.split("<image>")
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"the prompt has {len(pieces) - 1} <image> placeholders "
                         f"but {len(image_tokens)} images were given")
    ids, ends = [], []
    if compat == "transformers":
        tok, image_id = with_image_token(tokenizer)
        enc, counts = tok.encode(text), iter(image_tokens)
        for token, (_, end), special in zip(enc.ids, enc.offsets, enc.special_tokens_mask):
            if token == image_id:
                n = next(counts)
                ids += [IMAGE_TOKEN] * n
                ends += [None] * n
            else:
                ids.append(token)
                ends.append(None if special else end)
    else:
        offset = 0
        for i, piece in enumerate(pieces):
            if i:
                ids += [IMAGE_TOKEN] * image_tokens[i - 1]
                ends += [None] * image_tokens[i - 1]
                offset += len("<image>")
            enc = tokenizer.encode(piece, add_special_tokens=i == 0)
            ids += enc.ids
            ends += [None if special else offset + end
                     for (_, end), special in zip(enc.offsets, enc.special_tokens_mask)]
            offset += len(piece)
    if (len(ids) >= 2 and ids[0] == ids[1] != IMAGE_TOKEN
            and tokenizer.id_to_token(ids[0]) in ("<|begin_of_text|>", "<s>")):
        ids, ends = ids[1:], ends[1:]
    return ids, ends


def with_special_tokens(tokenizer, tokens) -> tuple:
    """(tokenizer, {token: id}) where each of `tokens` is an unsplittable special token: the tokenizer itself when it
    has them all (every llava-hf tokenizer.json has `<image>`), else a copy with the missing ones added at the next
    free ids, as the llava-hf conversions add them (the original checkpoints' tokenizers lack them)."""
    from tokenizers import AddedToken, Tokenizer

    def is_one_token(t):
        return tokenizer.encode(f"a{t}b", add_special_tokens=False).ids.count(tokenizer.token_to_id(t) or -1) == 1

    if not all(map(is_one_token, tokens)):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return tokenizer, {t: tokenizer.token_to_id(t) for t in tokens}


_IMAGE_AWARE = {}  # id(tokenizer) -> (the tokenizer, held so that its id is not reused; its copy with <image>)


def with_image_token(tokenizer):
    """(tokenizer, id of `<image>`), the tokenizer copied once with `<image>` added if it lacks it (never emitted)."""
    if id(tokenizer) not in _IMAGE_AWARE:
        _IMAGE_AWARE[id(tokenizer)] = (tokenizer, with_special_tokens(tokenizer, ["<image>"])[0])
    copy = _IMAGE_AWARE[id(tokenizer)][1]
    return copy, copy.token_to_id("<image>")


def tokenize(tokenizer, text: str, image_tokens=(), compat: str = "original") -> list[int]:
    """Token ids of a prompt, images expanded to their token counts (see `encode`)."""
    return encode(tokenizer, text, image_tokens, compat)[0]


# ----------------------------------------------------------------------------------------------------------------
# Training samples: labels, the official LLaVA JSON format, bad-data accounting, batching

IGNORE_INDEX = -100  # label of every position the loss skips


def tokenize_conversation(tokenizer, template: str, messages, image_tokens=(), compat: str = "original"):
    """(ids, labels) of a whole conversation: labels copy the ids of the answer spans (render_conversation) and
    are IGNORE_INDEX elsewhere, images included. The ids are exactly what inference would see for the same turns.

    Raises SampleError("tokenization mismatch") if an answer's labelled tokens do not spell that answer, the
    original's silent zero-loss failure (its preprocess_* functions only warn and set every label to -100) made loud."""
    text, targets = render_conversation(template, messages)
    ids, ends = encode(tokenizer, text, image_tokens, compat)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in targets:
        inside = [i for i, e in enumerate(ends) if e is not None and start < e <= end]
        for i in inside:
            labels[i] = ids[i]
        spelled = tokenizer.decode([ids[i] for i in inside], skip_special_tokens=False)
        if "".join(spelled.split()) != "".join(text[start:end].split()):  # tokenizers differ only in spacing
            raise SampleError("tokenization mismatch",
                              f"answer {text[start:end]!r} is not spelled by its labelled tokens")
    return ids, labels


class SampleError(Exception):
    """A training sample that cannot be used as it is; `kind` is the counter it is reported under."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def load_records(path, within=()) -> list[dict]:
    """A LLaVA JSON list, a JSONL file, or a mixture spec {"datasets": [{"json_path", "sampling_strategy"}]} whose
    strategies are "all", "first:N", "end:N", "random:N" or N as a percentage ("first:10%").

    A file that cannot be used ends the program with one line naming the file (and the line, for JSON that does
    not parse): nothing can be trained from it. A record that is not an object is refused the same way; records
    with missing or malformed fields are bad samples, counted and reported by id when drawn."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark, as Windows tools write, is skipped
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file; --data takes LLaVA JSON / JSONL or a mixture spec") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot be read as a UTF-8 text file ({type(e).__name__}); --data takes a "
                         f"LLaVA JSON / JSONL file or a mixture spec") from None
    if path.suffix == ".jsonl":
        # "\n" only: splitlines also splits at U+2028, U+2029, U+0085, raw in json.dumps(ensure_ascii=False) strings
        records = [parse_json(line, path, number) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        data = parse_json(text, path)
        if isinstance(data, dict) and "datasets" in data:
            records = load_mixture(data, path, within)
        elif isinstance(data, list):
            records = data
        else:
            raise SystemExit(f"error: {path}: expected a JSON list of samples or a mixture {{\"datasets\": [...]}}, "
                             f"found a {type(data).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise SystemExit(f"error: {path}: sample {i} is a {type(record).__name__}, expected an object with "
                             f"\"conversations\" (the LLaVA format); fix the file")
    return records


def parse_json(text: str, path, line: int = 0):
    """json.loads, or the program's end with file:line:column and what the parser expected there (`line`: the
    line of a JSONL file that `text` is)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{line or e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix that line or "
                         f"regenerate the file") from None


def load_mixture(spec: dict, path: Path, within=()) -> list[dict]:
    """The records a mixture spec draws from each of its files (`within`: the specs that include this one)."""
    records, within = [], (*within, path)
    for i, entry in enumerate(spec["datasets"] if isinstance(spec["datasets"], list) else [None]):
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise SystemExit(f"error: {path}: datasets[{i}] needs a \"json_path\" naming a LLaVA JSON / JSONL file")
        file, where = path.parent / entry["json_path"], f"{path}: datasets[{i}] json_path {entry['json_path']!r}"
        if not file.exists():
            raise SystemExit(f"error: {where}: {file} does not exist; a json_path is relative to the spec's folder")
        if (again := next((p for p in within if p.resolve() == file.resolve()), None)):
            raise SystemExit(f"error: {where} includes {again} again (a cycle); remove that entry")
        part = load_records(file, within)
        rule = entry.get("sampling_strategy", "all")
        strategy, _, amount = str(rule).partition(":")
        try:
            n = len(part) if strategy == "all" else (len(part) * int(amount[:-1]) // 100 if amount.endswith("%")
                                                     else int(amount))
        except ValueError:
            n = -1
        if strategy not in ("all", "first", "end", "random") or not 0 <= n <= len(part):
            raise SystemExit(f"error: {path}: datasets[{i}] sampling_strategy {rule!r}: expected \"all\", \"first:N\", "
                             f"\"end:N\" or \"random:N\" with 0 <= N <= {len(part)} (or N%)")
        records += (part[:n] if strategy in ("all", "first") else part[len(part) - n:] if strategy == "end"
                    else random.Random(0).sample(part, n))
    return records


def conversation_of(record) -> list[tuple[str, str]]:
    """The record's turns as [("user" | "assistant", text)], from either {"from", "value"} or {"role", "content"}."""
    key = "conversations" if "conversations" in record else "messages"
    turns = record.get(key)
    if turns is None:
        raise SampleError("missing conversations", 'the record has no "conversations" list')
    if not isinstance(turns, list):
        raise SampleError("malformed turn", f'"{key}" is a {type(turns).__name__}, expected a list of turns')
    if not turns:
        raise SampleError("empty conversation")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError("malformed turn", f"{key}[{i}] is a {type(turn).__name__}, expected an object")
        who, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(who, str) or who not in roles:
            raise SampleError("malformed turn", f'{key}[{i}] "from" {who!r}: expected "human" or "gpt" (or a "role")')
        if not isinstance(text, str):
            raise SampleError("malformed turn", f'{key}[{i}] has no "value" (or "content") string')
        if not text.isascii() and (bad := re.search("[\ud800-\udfff]", text)):  # the tokenizer takes no lone half
            raise SampleError("text is not valid Unicode", f"{key}[{i}]: lone surrogate {bad[0]!r} at {bad.start()}")
        messages.append((roles[who], text))
    if messages[0][0] != "user":
        raise SampleError("first turn not human", "a conversation must start with the human's turn")
    if any(a[0] == b[0] for a, b in zip(messages, messages[1:])):
        raise SampleError("turns not alternating")
    if messages[-1][0] != "assistant":
        messages = messages[:-1]  # a trailing question has no answer to learn from
    return messages


def image_files_of(record) -> list[str]:
    image = record.get("image")
    files = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SampleError("malformed image field", f'"image" is {image!r}; expected a file name or a list of them')
    return files


PLACEMENTS = ("interleaved", "front", "mixed")


def place_images(messages, placement: str = "interleaved", key=0):
    """Where the `<image>` placeholders go. A lone image always leads the first user turn as "<image>\n" + text,
    as the released models were trained (the original `preprocess_multimodal` moves it there). Several stay where
    the text puts them ("interleaved"), all move to the front of the first user turn ("front", NeXT-Interleave's
    "in-the-front" format), or either, drawn per sample from `key` ("mixed": the Interleave blog finds that
    training on both formats helps both)."""
    count = sum(text.count("<image>") for _, text in messages)
    if placement == "mixed":
        placement = "front" if random.Random(str(key)).random() < 0.5 else "interleaved"
    if count == 0 or (count > 1 and placement == "interleaved"):
        return messages
    if count == 1 and messages[0][1].startswith("<image>"):
        return messages
    moved = [(role, text.replace("<image>", "").strip() if "<image>" in text else text) for role, text in messages]
    moved[0] = (moved[0][0], "<image>\n" * count + moved[0][1])
    return moved


def place_visuals(prompt: str, num_images: int, video: bool) -> tuple[str, list[str]]:
    """The prompt with one `<image>` per visual, and the visuals' kinds ("image" / "video") in prompt order.

    `<image>` marks where the next image goes and `<video>` where the video goes (interleaved); visuals without
    a placeholder go in front of the text, the video first, each on its own line (the in-the-front format the
    released models were trained with for a single image)."""
    placed = re.findall(r"<image>|<video>", prompt)
    missing_images = num_images - placed.count("<image>")
    if missing_images < 0 or placed.count("<video>") > int(video):
        raise ValueError(f"the prompt has {placed.count('<image>')} <image> and {placed.count('<video>')} <video> "
                         f"placeholders for {num_images} images and {int(video)} videos")
    front = "<video>\n" * (video and "<video>" not in placed) + "<image>\n" * missing_images
    prompt = front + prompt
    kinds = ["video" if m == "<video>" else "image" for m in re.findall(r"<image>|<video>", prompt)]
    return prompt.replace("<video>", "<image>"), kinds


def load_image(path):
    """An RGB PIL image, turned upright as its EXIF orientation says (what a viewer shows; transformers' load_image
    does it, the original code does not), or SampleError("missing image" | "unreadable image" | "image too large").

    The size is read from the header and checked before anything is decoded, so a decompression bomb (a small file
    declaring a huge image) costs nothing. Every mode Pillow reads becomes 8-bit RGB: 16-bit greyscale is scaled
    down (a plain convert would clip it to white), palette transparency goes through RGBA."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size below decides instead
            with Image.open(path) as image:
                check_size(image.size, path)
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # a damaged EXIF block: keep the image as stored
                    pass
                return to_rgb(image)  # decodes now, so a truncated file fails here and not in a worker later
    except FileNotFoundError:
        raise SampleError("missing image", f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise SampleError("unreadable image", f"{path} is a folder, not an image file") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit (twice its warning size), met before ours
        raise SampleError("image too large", f"{path}: {e} This program decodes at most {MAX_IMAGE_PIXELS:,} "
                          f"pixels; resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # Pillow's plugins raise all of these
        raise SampleError("unreadable image",
                          f"{path}: {e}; is it a complete image file (JPEG, PNG, WebP, ...)?") from None


def check_size(size: tuple[int, int], path):
    """Refuse an image whose header declares more than MAX_IMAGE_PIXELS."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise SampleError("image too large", f"{path} declares {width} x {height} pixels, more than the "
                          f"{MAX_IMAGE_PIXELS:,} this program decodes; resize it first")


def to_rgb(image):
    """Any Pillow mode -> 8-bit RGB."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit ("I;16*") or 32-bit integer greyscale holding 16-bit values
        eight_bit = (np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def uniform_indices(total: int, k: int) -> list[int]:
    """K frame indices spread evenly over the whole clip, first and last included (OneVision's linspace sampling);
    every frame when the clip has no more than K."""
    if total <= k:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, k, dtype=int)]


FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
ANIMATED_SUFFIXES = {".gif", ".webp", ".png", ".apng"}  # Pillow reads the frames of these


def load_video(path, num_frames: int):
    """K RGB frames of a video (PIL images), uniformly sampled, or SampleError("missing video" | "unreadable video").

    Readers: a folder of frame images (in name order) and animated GIF/WebP/PNG with Pillow; any other file
    (mp4, mkv, webm, avi, mov, ...) with PyAV, the ecosystem's usual decoder, when it is installed."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise SampleError("missing video", str(path))
    try:
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise SampleError("unreadable video",
                                  f"{path}: a folder of frames holds no {sorted(FRAME_SUFFIXES)} files")
            return [load_image(files[i]) for i in uniform_indices(len(files), num_frames)]
        if path.suffix.lower() in ANIMATED_SUFFIXES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size decides instead
                with Image.open(path) as clip:
                    check_size(clip.size, path)
                    frames = []
                    for i in uniform_indices(getattr(clip, "n_frames", 1), num_frames):  # only the sampled frames
                        clip.seek(i)
                        frames.append(clip.convert("RGB"))
            return frames
        try:
            import av
        except ImportError:
            raise SampleError("unreadable video", f"{path}: reading {path.suffix or 'this'} files needs PyAV "
                              f"(pip install av); without it give an animated GIF/WebP or a folder of frames") from None
        with av.open(str(path)) as container:  # only the sampled frames are kept (a 10-minute clip is ~100 GB)
            stream = container.streams.video[0]  # mkv, webm, fragmented mp4 state no length: count the packets
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        with av.open(str(path)) as container:
            keep = set(uniform_indices(total, num_frames))
            frames = [f.to_image() for i, f in enumerate(container.decode(container.streams.video[0])) if i in keep]
        if not frames:
            raise SampleError("unreadable video", f"{path}: no video frames")
        return [f.convert("RGB") for f in frames]
    except SampleError:
        raise
    except Exception as e:  # Pillow and PyAV raise many kinds for a damaged file
        raise SampleError("unreadable video", f"{path}: {e}") from None


class SupervisedDataset(torch.utils.data.Dataset):
    """Official LLaVA records -> tokenised samples, read lazily (images are decoded when a sample is drawn).

    A sample is {"id", "input_ids", "labels", "images", "note"}; one that cannot be used is {"id", "error",
    "detail"} and is counted and reported by the trainer instead of being trained on."""

    def __init__(self, records, image_folder, tokenizer, template: str, model_cfg, max_len: int, *,
                 video_folder=None, num_frames: int = 32, image_placement: str = "interleaved"):
        self.records, self.image_folder = records, Path(image_folder or ".")
        self.video_folder = Path(video_folder) if video_folder else self.image_folder
        self.tokenizer, self.template, self.model_cfg, self.max_len = tokenizer, template, model_cfg, max_len
        self.num_frames, self.image_placement = num_frames, image_placement
        if image_placement not in PLACEMENTS or num_frames < 1:
            raise ValueError(f"image_placement {image_placement!r} not in {PLACEMENTS}, or num_frames {num_frames} < 1")

    def __len__(self):
        return len(self.records)

    def modality_lengths(self) -> list[int]:
        """A cheap length estimate per record (words), negative for text-only ones: what the grouped sampler needs."""
        lengths = []
        for r in self.records:
            turns = r.get("conversations") if isinstance(r.get("conversations"), list) else []  # bad ones fail later
            words = sum(len(str(t.get("value", t.get("content", ""))).split()) for t in turns if isinstance(t, dict))
            lengths.append(words if r.get("image") or r.get("video") else -max(words, 1))
        return lengths

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample_id = record.get("id", index)
        try:
            messages = place_images(conversation_of(record), self.image_placement, key=sample_id)
            files, video = image_files_of(record), record.get("video")
            placeholders = sum(text.count("<image>") for _, text in messages)
            if video is not None and not isinstance(video, str):
                raise SampleError("malformed video field", f'"video" is {video!r}; expected a file or folder name')
            if video is not None and files:
                raise SampleError("image count mismatch", "a sample holds either images or one video, not both")
            if placeholders != (1 if video is not None else len(files)):
                raise SampleError("image count mismatch", f"{placeholders} <image> placeholders, "
                                  + ("one video (one placeholder)" if video is not None else f"{len(files)} images"))
            if (files or video is not None) and self.model_cfg.vision is None:
                raise SampleError("image for a text-only model")
            if video is not None:
                images = [process_video(load_video(self.video_folder / video, self.num_frames), self.model_cfg)]
            else:
                images = process_images([load_image(self.image_folder / f) for f in files], self.model_cfg)
            ids, labels = tokenize_conversation(self.tokenizer, self.template, messages,
                                               [im.num_tokens for im in images], self.model_cfg.compat)
            note = None
            if len(ids) > self.max_len:
                if IMAGE_TOKEN in ids[self.max_len - 1:]:
                    raise SampleError("truncated through an image", f"{len(ids)} tokens > max length {self.max_len}")
                ids, labels, note = ids[: self.max_len], labels[: self.max_len], "truncated to max length"
            if all(label == IGNORE_INDEX for label in labels):
                raise SampleError("no answer tokens", "nothing left to learn (after truncation?)")
        except SampleError as e:
            return {"id": sample_id, "error": e.kind, "detail": str(e)}
        except ImageTooLarge as e:  # within load_image's limit as read, not once padded to a square or resized
            return {"id": sample_id, "error": "image too large", "detail": f"image too large: {video or files}: {e}"}
        except Exception as e:  # what no check foresaw: still one bad sample, not the end of the run (a systematic
            kind = f"unexpected error: {type(e).__name__}"  # failure is stopped by the trainer's bad-fraction rule)
            return {"id": sample_id, "error": kind, "detail": f"{kind}: {e}"}
        return {"id": sample_id, "input_ids": ids, "labels": labels, "images": images, "note": note}


def collate(samples, pad_id: int) -> dict:
    """Right-padded batch: input_ids / labels / padding_mask (B, T), the images in prompt order, and the samples
    that could not be used (`bad`: [(id, kind, detail)]) or were truncated (`notes`)."""
    good = [s for s in samples if "error" not in s]
    batch = {"bad": [(s["id"], s["error"], s["detail"]) for s in samples if "error" in s],
             "notes": [(s["id"], s["note"]) for s in good if s["note"]], "size": len(good)}
    T = max((len(s["input_ids"]) for s in good), default=1)
    ids = torch.full((max(len(good), 1), T), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(good):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    batch.update(input_ids=ids, labels=labels, padding_mask=mask, images=[im for s in good for im in s["images"]])
    return batch


def global_batches(lengths, global_batch_size: int, seed: int, epoch: int, group_by_modality: bool) -> list[list[int]]:
    """The order of one epoch as a list of global batches (lists of record indices), a pure function of
    (seed, epoch) so that every rank agrees and a resumed run continues exactly. With `group_by_modality` (the
    original's group_by_modality_length) a batch holds only image or only text samples, except one mixed batch of
    leftovers, and is sorted by length so that its micro-batches pad little. The last partial batch is dropped."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    n = len(lengths)
    if not group_by_modality:
        order = torch.randperm(n, generator=g).tolist()
        return [order[i: i + global_batch_size] for i in range(0, n - global_batch_size + 1, global_batch_size)]
    batches, leftovers = [], []
    for group in ([i for i in range(n) if lengths[i] > 0], [i for i in range(n) if lengths[i] <= 0]):
        order = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
        full = len(order) - len(order) % global_batch_size
        batches += [order[i: i + global_batch_size] for i in range(0, full, global_batch_size)]
        leftovers += order[full:]
    batches += [leftovers[i: i + global_batch_size]
                for i in range(0, len(leftovers) - global_batch_size + 1, global_batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return [sorted(b, key=lambda i: -abs(lengths[i])) for b in batches]
