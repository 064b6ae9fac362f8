"""A checkpoint's text side: its tokenizer (`load_tokenizer`), stop ids (`eos_token_ids`), and which chat template
it uses: the one a folder we wrote names, else the one it ships as Jinja (chat_template.json / .jinja,
tokenizer_config.json) matched against ours, else the preset's, else a guess.

    Jinja template  --render_jinja on probes-->  prompts: one user turn without and with an image, and after a
                                                 short history (user / assistant / user)
    prompts         --_normalise, compare------>  the names in data.TEMPLATES whose render_prompt gives the same

Only the choice is made here: inference and training always render our own strings (data.py), so a released
template's quirks (a missing system sentence, `<\\s>` for `</s>`) never reach a prompt.
"""

import re
import sys
import time
from pathlib import Path

from convert import CheckpointError, Preset, find_preset, hub_command, read_json
from data import TEMPLATES, render_prompt, system_slot


# what a shipped template can match: plain is stage 1's caption format, never a chat format; qwen_2 is qwen_1_5
CHAT_FORMATS = [name for name in TEMPLATES if name not in ("plain", "qwen_2")]
PROBE_Q, PROBE_A, PROBE_Q2 = "What is in the picture?", "A red cube.", "And behind it?"
PROBES = ((0, [("user", PROBE_Q)]), (1, [("user", PROBE_Q)]),  # (images, turns): one turn without and with an image,
          (1, [("user", PROBE_Q), ("assistant", PROBE_A), ("user", PROBE_Q2)]))  # and after a short history


def jinja_renderer(source: str, bos: str = "", eos: str = ""):
    """messages -> text: a Hugging Face chat template compiled as transformers' apply_chat_template does it
    (sandboxed, trim_blocks and lstrip_blocks, `{% generation %}` blocks rendered as their body), rendered with
    add_generation_prompt=True. Raises ImportError without jinja2, jinja2.TemplateError for a broken template."""
    # jinja2 is required: the released templates use loops, filters and namespace(), which only Jinja reads exactly
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} tag marks assistant text; here it is only text
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise TemplateUnsafe(f"jinja2 {jinja2.__version__}'s sandbox has known escapes (fixed in 3.1.6)")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(source)
    end = time.monotonic() + RENDER_SECONDS  # for every render of this template together

    def stop_at_the_deadline(frame, event, arg):  # the sandbox bounds range(), not loops inside loops
        if time.monotonic() > end:
            raise TemplateUnsafe(f"it ran past {RENDER_SECONDS:g} s rendering short prompts")
        return stop_at_the_deadline

    def render(messages):
        before = sys.gettrace()
        sys.settrace(stop_at_the_deadline)
        try:
            return template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        finally:
            sys.settrace(before)
    return render


RENDER_SECONDS = 5.0  # the released templates render the probes in milliseconds


class TemplateUnsafe(Exception):
    """A shipped chat template this program will not render: an old jinja2, or one that runs too long."""


def _normalise(text: str, stops) -> str:
    # What the released llava-hf templates change, all of which the match ignores: they spell no BOS (the tokenizer
    # adds it), close an answer their own way (LLaVA-1.5's with a space and no </s>, the Mistral copies' with a literal
    # `<\s> `), and put other whitespace around a message (Llama-3's: a newline before every text). So: the BOS
    # dropped, everything between the answer and the next turn read as one space, every whitespace run as one
    # space, none after <|im_end|> (34B's ChatML has no newline there, Qwen's has: one_of tells them apart by
    # tokenizer). Whether there is whitespace at all stays significant elsewhere ("USER:" against "USER :").
    text = text.replace("<\\s>", "</s>")
    for bos in ("<s>", "<|begin_of_text|>"):
        text = text.removeprefix(bos)
    close = "|".join(re.escape(s) for s in stops)
    text = re.sub(re.escape(PROBE_A) + rf"\s*(?:{close})?\s*", PROBE_A + " ", text)
    return re.sub(r"\s+", " ", re.sub(r"<\|im_end\|>\s*", "<|im_end|>", text))


def _probe_messages(system, images: int, turns, parts: bool) -> list[dict]:
    """A probe as apply_chat_template takes it: typed parts (llava-hf) or plain strings, images first."""
    def message(role, text, n=0):
        return {"role": role, "content": [{"type": "image"}] * n + [{"type": "text", "text": text}] if parts
                else "<image>\n" * n + text}

    return ([message("system", system)] if system else []) + [
        message(role, text, images if i == 0 else 0) for i, (role, text) in enumerate(turns)]


def matching_templates(source: str, bos: str = "", eos: str = "") -> list[str]:
    """The names in TEMPLATES whose prompts `source` (a Jinja chat template) renders on every probe: our default
    system sentence is passed as a system message (the llava-hf templates add none of their own), and messages go
    in both shapes, llava-hf's typed parts and plain strings with `<image>\n` in front (text-only LLM templates)."""
    import jinja2

    try:
        render = jinja_renderer(source, bos, eos)  # without jinja2 an ImportError: the caller says what to do
    except jinja2.TemplateError:  # not a template at all
        return []

    def renders(name: str, parts: bool) -> bool:
        t, slot = TEMPLATES[name], system_slot(name)
        system = t.system[len(slot[0]):len(t.system) - len(slot[1])] if slot else None
        for images, turns in PROBES:
            ours = render_prompt(name, [(role, "<image>\n" * images + text if i == 0 else text)
                                        for i, (role, text) in enumerate(turns)])
            try:
                theirs = render(_probe_messages(system, images, turns, parts))
            except TemplateUnsafe:
                raise
            except Exception:  # a template that cannot take this shape of message (a Jinja or Python error)
                return False
            if _normalise(theirs, t.stop) != _normalise(ours, t.stop):
                return False
        return True

    return [name for name in CHAT_FORMATS if renders(name, parts=True) or renders(name, parts=False)]


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint's files


CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")  # transformers 5 reads both; the .json wins


def shipped_template(folder: Path | None) -> tuple[Path, str] | None:
    """(file, Jinja text) of the chat template a checkpoint ships: chat_template.json ({"chat_template": ...}),
    chat_template.jinja, or tokenizer_config.json's "chat_template" (a string, or [{name, template}]: "default")."""
    if folder is None:
        return None
    for name in (*CHAT_TEMPLATE_FILES, "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            try:
                return path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); download it again, or pass "
                                      f"--template NAME") from None
        text = read_json(path).get("chat_template")
        if isinstance(text, list):
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(text, str):
            return path, text
        if name != "tokenizer_config.json":
            raise CheckpointError(f"{path}: expected {{\"chat_template\": \"...\"}}; download it again, or pass "
                                  f"--template NAME")
    return None


def special_strings(folder: Path) -> tuple[str, str]:
    """(bos, eos) strings tokenizer_config.json names, for templates that spell {{ bos_token }} / {{ eos_token }}."""
    raw = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    value = lambda v: (v.get("content") if isinstance(v, dict) else v) or ""  # noqa: E731  (an AddedToken dict)
    return value(raw.get("bos_token")), value(raw.get("eos_token"))


def default_template(source: str, tokenizer, folder: Path | None = None) -> str:
    """The chat format of a checkpoint (--template overrides it): the one a folder we wrote names in config.json
    (train.py's checkpoints, export.py's exports), else the one the template it ships renders (CheckpointError
    when none of ours does, unless it is a preset), else the preset's, else a guess from the tokenizer's special
    tokens, said on stderr."""
    folder = folder or (Path(source) if source and Path(source).is_dir() else None)
    if saved := saved_template(folder or source):
        return saved
    preset = find_preset(source)
    if shipped := shipped_template(folder):
        path, text = shipped
        try:
            found = matching_templates(text, *special_strings(path.parent))
        except ImportError:
            raise CheckpointError(f"{path}: reading its chat template needs jinja2 (pip install jinja2), or pass "
                                  f"--template NAME") from None
        except RecursionError:  # Jinja's parser recurses once per level of nesting
            raise CheckpointError(f"{path}: its chat template is nested too deeply to compile; download it again, or "
                                  f"pass --template NAME") from None
        except TemplateUnsafe as e:
            raise CheckpointError(f"{path}: its chat template is not rendered: {e}; pass --template NAME, or "
                                  f"pip install -U jinja2") from None
        if found:
            return one_of(found, preset, folder, tokenizer)
        if preset:  # the table holds the model card's format: a hub file edited since is reported, not fatal
            print(f"note: {path}: its chat template renders none of ours; using the preset's {preset.template}",
                  file=sys.stderr)
            return preset.template
        raise CheckpointError(f"{path}: its chat template renders none of our templates' prompts; pass --template "
                              f"NAME (one of {', '.join(CHAT_FORMATS)}) for the format the model was trained with")
    if preset:
        return preset.template
    guess, why = guess_template(tokenizer)
    print(f"note: {source} ships no chat template; template {guess}, from its special tokens ({why}); pass "
          f"--template NAME if that is wrong", file=sys.stderr)
    return guess


def one_of(found: list[str], preset: Preset | None, folder: Path, tokenizer) -> str:
    """The template among several a shipped template renders alike: the llava-hf Vicuna templates add no system
    sentence, so 1.5 and 1.6 render alike, and the ChatML ones differ only in it and a newline."""
    if preset and preset.template in found:
        return preset.template
    if {"vicuna_v1", "llava_v1"} <= set(found):  # LLaVA-1.5 was evaluated with vicuna_v1, 1.6 with llava_v1
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        return "llava_v1" if config.get("model_type") == "llava_next" else "vicuna_v1"
    if {"chatml_direct", "qwen_1_5"} <= set(found):  # Yi's tokenizer (LLaVA-1.6-34B) has <|startoftext|>, Qwen's not
        return "chatml_direct" if tokenizer.token_to_id("<|startoftext|>") is not None else "qwen_1_5"
    return found[0]


def guess_template(tokenizer) -> tuple[str, str]:
    """(template, why) from the special tokens alone: for checkpoints that ship no chat template (original layouts)."""
    if tokenizer.token_to_id("<|im_start|>") is not None:
        if tokenizer.token_to_id("<|endoftext|>") is not None:
            return "qwen_1_5", "<|im_start|> and <|endoftext|>: Qwen"
        return "chatml_direct", "<|im_start|> without <|endoftext|>: Yi"
    if tokenizer.token_to_id("<|eot_id|>") is not None:
        return "llava_llama_3", "<|eot_id|>: Llama-3"
    if tokenizer.token_to_id("[INST]") is not None:
        return "mistral_instruct", "[INST] is one token"
    return "vicuna_v1", "none of <|im_start|>, <|eot_id|>, [INST]"


TEMPLATE_KEY = "llava_template"  # ours, in config.json: the chat format (data.TEMPLATES) the model was trained with


def saved_template(folder: Path) -> str | None:
    """The chat format a checkpoint written by train.py was trained with (None for released checkpoints)."""
    path = Path(folder) / "config.json"
    name = read_json(path).get(TEMPLATE_KEY) if path.exists() else None
    if name is not None and not (isinstance(name, str) and name in TEMPLATES):  # else a crash at the first prompt
        raise CheckpointError(f"{path}: \"{TEMPLATE_KEY}\" {name!r} is not one of our templates "
                              f"({', '.join(sorted(TEMPLATES))}); fix it, or pass --template NAME")
    return name


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer and its stop ids


def load_tokenizer(folder: Path, source: str):
    """The `tokenizers` tokenizer of a checkpoint. Original LLaVA-1.5/1.6 repos ship only SentencePiece files;
    their llava-hf twins hold the same vocabulary as tokenizer.json, so a preset falls back to those."""
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").exists():
        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a plain Exception for any malformed file
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a readable tokenizer.json ({str(e)[:200]}); "
                                  f"download it again") from None
    preset = find_preset(source)
    if preset and preset.hf and preset.hf != source:
        from huggingface_hub import hf_hub_download

        try:
            return Tokenizer.from_file(hf_hub_download(preset.hf, "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{folder} has no tokenizer.json and {preset.hf}/tokenizer.json could not be fetched "
                                  f"({type(e).__name__}); download it with "
                                  f"`{hub_command(preset.hf, 'tokenizer.json')}`") from e
    hint = " (it ships only a SentencePiece tokenizer.model)" if (folder / "tokenizer.model").exists() else ""
    raise CheckpointError(f"{folder} has no tokenizer.json{hint}. Convert it once with `pip install transformers "
                          f"sentencepiece` and `AutoTokenizer.from_pretrained(path).save_pretrained(path)`, or copy "
                          f"tokenizer.json from the matching llava-hf repo into the folder.")


def past_vocab(tokenizer, ids, vocab_size: int) -> str | None:
    """Why a prompt's ids cannot reach the model, or None. The llava-hf tokenizer.json that the original-layout
    presets borrow (load_tokenizer) adds <image> = 32000 and <pad> = 32001 past the original 32000-row embedding:
    <image> is split out before encoding (data.encode), but a prompt that spells "<pad>" encodes to 32001."""
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is None:
        return None
    return (f"the prompt holds the token {tokenizer.id_to_token(bad)!r} (id {bad}), which the tokenizer knows but the "
            f"model does not (its embedding has {vocab_size} rows); remove that text from the prompt")


def eos_token_ids(folder: Path) -> set[int]:
    """eos ids named by config.json (or its text_config) and generation_config.json."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            raw = read_json(folder / name)
            for value in (raw.get("eos_token_id"), (raw.get("text_config") or {}).get("eos_token_id")):
                ids |= set(value if isinstance(value, list) else [value] if value is not None else [])
    return ids
