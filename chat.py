"""Many questions to one loaded model: a multi-turn chat on the terminal, and LLaVA's question files in batches.

    python infer.py IMAGE --chat [--system TEXT]
        history as token ids (1, T) in the model's template; each turn prefills only its own tokens on top of the
        KV cache (1, kv_heads, T, hd) per layer, so the image is encoded once, not once per turn as in the original
        CLI (llava/serve/cli.py re-renders and re-prefills the whole history every turn)
    python infer.py --batch-file questions.jsonl --image-folder DIR --output answers.jsonl [--batch-size 8]
        rows {question_id, image, text} -> rows {question_id, prompt, text, model_id}, as LLaVA's
        model_vqa_loader.py reads and writes them; --batch-size prompts go through generate_batch together
        (B, T) -> (B, new); ids already in the output are skipped, so a killed run continues where it stopped
"""

import json
import os
import sys
from pathlib import Path

import torch

from anyres import process_images
from chat_template import past_vocab
from data import TEMPLATES, SampleError, load_image, render_prompt, system_slot, tokenize
from model import KVCache


def add_flags(p):
    g = p.add_argument_group("chat and question files")
    g.add_argument("--chat", action="store_true", help="a multi-turn chat on the terminal about the images given "
                   "(/image PATH adds one, /reset starts over, Ctrl-D leaves)")
    g.add_argument("--system", default=None, help="system message replacing the template's default (--chat)")
    g.add_argument("--batch-file", default=None, help="LLaVA question file: JSONL rows {question_id, image, text}")
    g.add_argument("--image-folder", default=".", help="folder the question file's image paths are relative to")
    g.add_argument("--output", default=None, help="answers JSONL (--batch-file); ids already in it are skipped")
    g.add_argument("--batch-size", type=int, default=8, help="questions generated together (--batch-file)")


def run(args, device: str, dtype, load_model):
    """infer.main's branch for --chat and --batch-file; `load_model` is infer.load_model, handed in so that the two
    files do not import each other."""
    if args.batch_file:
        if args.chat or args.inputs:
            sys.exit("error: --batch-file takes its images and questions from the file: drop the IMAGE/PROMPT "
                     "arguments and --chat")
        if not args.output:
            sys.exit("error: --batch-file needs --output answers.jsonl")
        if args.batch_size < 1:
            sys.exit(f"error: --batch-size {args.batch_size}: expected 1 or more")
        questions = read_questions(args.batch_file)
        model, tokenizer, eos, template = load_model(args, device, dtype, ["image"])
        return answer_file(model, tokenizer, template, stops(tokenizer, template, eos, args), questions, args)
    if args.video:
        sys.exit("error: --chat takes images (on the command line or with /image), not --video")
    paths, first = list(args.inputs), None
    if paths and not Path(paths[-1]).is_file():  # `infer.py IMAGE "question" --chat`: the first message
        first = paths.pop()
    try:
        images = [load_image(path) for path in paths]
    except SampleError as e:
        sys.exit(f"error: {e}")
    model, tokenizer, eos, template = load_model(args, device, dtype, ["image"] * len(images))
    session = Session(model, tokenizer, template, stops(tokenizer, template, eos, args), args.system)
    chat(session, images, args, first=first)


def stops(tokenizer, template, eos: set[int], args) -> set[int]:
    from data import stop_token_ids

    return set() if args.ignore_eos else stop_token_ids(tokenizer, template, eos)


# ----------------------------------------------------------------------------------------------------------------
# Chat


class Session:
    """One conversation: its token ids so far and the KV cache holding all of them but the last answer's final
    token (sampled, not yet fed). A turn renders only the text after that token, in the model's template:

        turn 1   opening + user(<image>\\n... q1) + generation prompt          e.g. "SYS USER: <image>\\nq1 ASSISTANT:"
        turn k   rest of the assistant turn + user(qk) + generation prompt   e.g. "USER: qk ASSISTANT:" after "</s>"
    """

    def __init__(self, model, tokenizer, template: str, stop: set[int], system: str | None = None):
        if template == "plain":
            raise SystemExit("error: the plain template (stage-1 captions) has no turns to chat in; pass --template")
        self.model, self.tokenizer, self.template, self.stop, self.system = model, tokenizer, template, stop, system
        self.reset()

    def reset(self):
        self.ids: list[int] = []  # every token of the conversation (IMAGE_TOKEN runs for images)
        self.images = []  # ProcessedImage of every image in the conversation, in order
        self.cache = None
        self.closed = True  # the last answer ended with a stop token

    def turn_text(self, text: str) -> str:
        t = TEMPLATES[self.template]
        if not self.ids:  # the opening, with the user's system message in the template's slot
            slot, system = system_slot(self.template), self.system
            if system is not None and slot is None:  # no system sentence: it opens the first message
                text = f"{system}\n\n{text}"
            opening = t.system if system is None or slot is None else slot[0] + system + slot[1]
            return opening + render_prompt(self.template, [("user", text)])[len(t.system):]
        _, tail = t.assistant.split("{}")
        end = next((s for s in t.stop if s in tail), None)
        rest = tail[tail.index(end) + len(end):] if self.closed and end else tail
        return rest + render_prompt(self.template, [("user", text)])[len(t.system):]

    def ask(self, text: str, images=(), **sampling):
        """Yields the answer's token ids; the turn's images (PIL) go in front of its text."""
        model = self.model
        processed = process_images(list(images), model.cfg) if images else []
        new = tokenize(self.tokenizer, self.turn_text("<image>\n" * len(processed) + text),
                       [im.num_tokens for im in processed])
        if self.ids:  # the BOS belongs to the start of the conversation only
            new = drop_added_prefix(self.tokenizer, new)
        fed = self.ids[-1:] + new  # with the last answer token: sampled, never fed
        limit = model.cfg.text.max_position_embeddings
        need = len(self.ids) + len(new) + sampling.get("max_new_tokens", 256)
        if need > limit:
            raise ValueError(f"the conversation would reach {need} positions, past the model's {limit}; "
                             f"/reset to start over")
        if problem := past_vocab(self.tokenizer, new, model.cfg.text.vocab_size):  # before the turn joins the state
            raise ValueError(problem)
        self.grow_cache(need)
        self.ids += new
        self.images += processed
        answer = []
        for token in continue_generation(model, self.cache, fed, processed, **sampling):
            answer.append(token)
            yield token
            if token in self.stop:
                break
        self.ids += answer
        self.closed = bool(answer) and answer[-1] in self.stop

    def grow_cache(self, positions: int):
        """Room for `positions` in the cache: allocated in steps of 1024, copied over when it grows."""
        model = self.model
        if self.cache is not None and self.cache.k.shape[3] >= positions:
            return
        size = -(-positions // 1024) * 1024
        emb = model.language_model.embed_tokens.weight  # the compute dtype (an int8 head's weight is not)
        cache = KVCache(model.cfg.text, 1, size, emb.dtype, emb.device)
        if self.cache is not None:
            n = cache.length = self.cache.length
            cache.k[:, :, :, :n], cache.v[:, :, :, :n] = self.cache.k[:, :, :, :n], self.cache.v[:, :, :, :n]
        self.cache = cache


def drop_added_prefix(tokenizer, ids: list[int]) -> list[int]:
    """`ids` without the tokens the tokenizer adds in front of any text (a BOS), if it starts with them."""
    added = tokenizer.encode("", add_special_tokens=True).ids
    return ids[len(added):] if added and ids[:len(added)] == added else ids


@torch.inference_mode()
def continue_generation(model, cache, new_ids, images, *, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0):
    """Prefill `new_ids` on top of what `cache` holds, then decode one token at a time; yields the new ids."""
    from generate import gemv_context, sample

    device = model.language_model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = model(torch.tensor([new_ids], device=device), images or None, cache=cache, num_logits=1)[0, -1]
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        yield token
        if step == max_new_tokens - 1:
            return
        with gemv_context(model, 1):
            logits = model(torch.tensor([[token]], device=device), cache=cache, num_logits=1)[0, -1]


HELP = "/image PATH adds an image to your next message, /reset starts over, Ctrl-D leaves"


def chat(session: Session, images, args, stdin=None, first: str | None = None):
    """The terminal loop: a line in, the answer streamed out (stdout); prompts and notes go to stderr. `first` is
    a first message given on the command line."""
    from generate import stream_answer

    stdin = stdin or sys.stdin
    pending = list(images)
    print(f"chat ({session.template}): {HELP}", file=sys.stderr)
    while True:
        print("user> ", end="", file=sys.stderr, flush=True)
        line, first = (first + "\n", None) if first else (stdin.readline(), None)
        if not line:  # Ctrl-D
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            pending = list(images)
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            if session.model.vision_tower is None:
                print("error: this is a text-only model; it cannot take images", file=sys.stderr)
                continue
            try:
                pending.append(load_image(line[len("/image"):].strip()))
            except SampleError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}", file=sys.stderr)
            continue
        print("assistant> ", end="", file=sys.stderr, flush=True)
        try:
            tokens = session.ask(line, pending, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)
            stream_answer(session.tokenizer, tokens, session.stop, show=True)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        pending = []
        sys.stdout.write("\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------
# Question files


def read_questions(path) -> list[dict]:
    """The rows of a LLaVA question file; a bad row is one line naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        sys.exit(f"error: --batch-file {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path}:{n}: not JSON ({e.msg}); expected one object per line")
        missing = [k for k in ("question_id", "text") if not isinstance(row, dict) or k not in row]
        if missing:
            sys.exit(f"error: {path}:{n}: missing {', '.join(missing)}; each row needs question_id, text and image "
                     f"(LLaVA's question-file format)")
        rows.append(row)
    ids = [r["question_id"] for r in rows]
    if len(set(map(str, ids))) != len(ids):
        sys.exit(f"error: {path}: question_id values repeat; they must be unique (answers are matched by them)")
    return rows


def answered_ids(path: Path) -> set[str]:
    """question_ids already in the answers file. A torn last line (a killed run) is cut off so appends stay valid."""
    if not path.exists():
        return set()
    lines = path.read_text().splitlines(keepends=True)
    done, keep = set(), []
    for line in lines:
        try:
            done.add(str(json.loads(line)["question_id"]))
            keep.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return done


def answer_file(model, tokenizer, template, stop, questions, args):
    """Answer every question not yet in args.output, args.batch_size at a time, appending as each batch ends."""
    from tqdm import tqdm

    from generate import generate_batch

    output = Path(args.output)
    done = answered_ids(output)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    print(f"{len(questions)} questions, {len(questions) - len(todo)} already answered in {output}", file=sys.stderr)
    model_id = Path(args.model.rstrip("/")).name
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as out, tqdm(total=len(todo), unit="q", file=sys.stderr) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            prompts, images = zip(*(question_prompt(model, tokenizer, template, q, args.image_folder) for q in batch))
            answers = generate_batch(model, list(prompts), list(images), max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, stop_ids=stop, seed=args.seed)
            for q, ids in zip(batch, answers):
                text = tokenizer.decode([t for t in ids if t not in stop]).strip()
                out.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                                      "model_id": model_id}) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a killed run loses at most the batch in flight
            bar.update(len(batch))


def question_prompt(model, tokenizer, template, question, image_folder):
    """(prompt ids, [ProcessedImage]) of one question: its image in front of the text (as LLaVA's loader puts it)."""
    from data import place_visuals

    names = question.get("image") or []
    names = [names] if isinstance(names, str) else names
    try:
        images = [load_image(Path(image_folder) / name) for name in names]
        text, _ = place_visuals(question["text"], len(images), False)
        processed = process_images(images, model.cfg) if images else []  # ImageTooLarge is a ValueError
    except (SampleError, ValueError) as e:
        sys.exit(f"error: question {question['question_id']}: {e}")
    ids = tokenize(tokenizer, render_prompt(template, [("user", text)]), [im.num_tokens for im in processed])
    if problem := past_vocab(tokenizer, ids, model.cfg.text.vocab_size):
        sys.exit(f"error: question {question['question_id']}: {problem}")
    return ids, processed
