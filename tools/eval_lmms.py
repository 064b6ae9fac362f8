"""lmms-eval adapter: this model as the lmms-eval model "llava_scratch", generating through `generate.generate_batch`.

    python -m tools.eval_lmms --model_args pretrained=llava-onevision-qwen2-0.5b-ov --tasks mme,pope --batch_size 8
    (lmms-eval's own command line with this model registered; `--model llava_scratch` is implied)

or from Python: `lmms_eval.evaluator.simple_evaluate(model=LlavaScratch("runs/stage2/final"), tasks=[...])`.

A generate_until request (lmms-eval's "simple" model API):

    Instance.args  (context, gen_kwargs, doc_to_visual, doc_id, task, split)
      -> doc_to_visual(doc): PIL images and/or video paths
      -> "<image>\n" per visual in front of the context (unless it places them), the model's chat template
      -> ids with each image's token count (anyres)  -> generate_batch, batch_size prompts of equal gen_kwargs
      -> the decoded answer, cut at the first of gen_kwargs["until"]

A loglikelihood request (context, continuation, ...) returns the mean negative log-likelihood of the continuation's
tokens and whether greedy decoding would produce them: lmms-eval's own LLaVA adapters return this loss, not a
log-probability, and its multiple-choice tasks pick the option with the smallest value.

lmms-eval is needed only here (`pip install lmms-eval`; the adapter alone needs `pip install --no-deps lmms-eval
loguru pytz`). lmms-eval's built-in tasks download their data sets from the Hugging Face hub.
"""

import json
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError as e:
    sys.exit(f"error: tools/eval_lmms.py needs lmms-eval ({e}): pip install lmms-eval")

from anyres import process_images, process_video
from chat_template import default_template, eos_token_ids, load_tokenizer
from convert import CheckpointError, load_pretrained
from data import load_video, render_prompt, stop_token_ids, tokenize
from data import place_visuals
from generate import generate_batch

MODEL_NAME = "llava_scratch"


class LlavaScratch(lmms):
    is_simple = True  # requests carry a text context and a doc_to_visual function, not chat messages

    def __init__(self, pretrained: str = "llava-onevision-qwen2-0.5b-ov", template: str | None = None,
                 batch_size: int = 1, device: str | None = None, dtype: str | None = None, compat: str = "original",
                 max_new_tokens: int = 1024, frames: int = 32, **unused):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = None if dtype in (None, "None", "auto") else dtype  # lmms-eval's parser passes None as "None"
        dtype = getattr(torch, dtype or ("bfloat16" if str(device).startswith("cuda") else "float32"))
        try:
            self.model, folder = load_pretrained(str(pretrained), dtype=dtype, device=device, compat=compat)
            self.tokenizer = load_tokenizer(folder, str(pretrained))
            self.template = template or default_template(str(pretrained), self.tokenizer, folder)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        self.stop = stop_token_ids(self.tokenizer, self.template, eos_token_ids(folder))
        # lmms-eval's parser turns numbers into int or float ("8" -> 8, "8.0" -> 8.0)
        self.batch_size, self.max_new_tokens, self.frames = int(batch_size), int(max_new_tokens), int(frames)

    # ------------------------------------------------------------------------------------------------------------
    # A request -> (token ids, processed visuals)

    def visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]

    def encode(self, context: str, visuals: list):
        """(prompt ids, processed visuals): images and at most one video (a path) in front of the context."""
        images = [v for v in visuals if not isinstance(v, str)]
        videos = [v for v in visuals if isinstance(v, str)]
        if len(videos) > 1:
            raise ValueError(f"{len(videos)} videos in one request; this model takes at most one")
        frames = load_video(videos[0], self.frames) if videos else None
        text, kinds = place_visuals(context, len(images), frames is not None)
        stills = iter(process_images(images, self.model.cfg))
        processed = [process_video(frames, self.model.cfg) if k == "video" else next(stills) for k in kinds]
        prompt = render_prompt(self.template, [("user", text)])
        return tokenize(self.tokenizer, prompt, [p.num_tokens for p in processed]), processed

    # ------------------------------------------------------------------------------------------------------------
    # The three request types

    def generate_until(self, requests) -> list[str]:
        """Requests with equal gen_kwargs are batched; results come back in request order."""
        groups = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        answers, bar = [None] * len(requests), tqdm(total=len(requests), desc=MODEL_NAME, disable=self.rank != 0)
        for indices in groups.values():
            gen = dict(requests[indices[0]].args[1])
            until = gen.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            if gen.get("num_beams", 1) not in (None, 1):
                raise ValueError(f"num_beams={gen['num_beams']}: beam search is not implemented; "
                                 f"greedy or sampling only")
            options = dict(max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)),
                           temperature=float(gen.get("temperature") or 0) if gen.get("do_sample", True) else 0.0,
                           top_p=float(gen.get("top_p") or 1.0), stop_ids=self.stop)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                encoded = [self.encode(requests[i].args[0], self.visuals(*requests[i].args[2:6])) for i in chunk]
                outs = generate_batch(self.model, [ids for ids, _ in encoded], [vis for _, vis in encoded], **options)
                for i, out in zip(chunk, outs):
                    answers[i] = cut_at(self.tokenizer.decode([t for t in out if t not in self.stop]), until).strip()
                bar.update(len(chunk))
        bar.close()
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            ids, processed = self.encode(context, self.visuals(doc_to_visual, doc_id, task, split))
            target = self.tokenizer.encode(continuation, add_special_tokens=False).ids
            device = self.model.language_model.embed_tokens.weight.device
            full = torch.tensor([ids + target], device=device)  # (1, T + K)
            logits = self.model(full, processed or None)[0, len(ids) - 1:-1].float()  # (K, V): the continuation's
            expected = full[0, len(ids):]
            loss = F.cross_entropy(logits, expected)
            results.append((float(loss), bool((logits.argmax(-1) == expected).all())))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not implemented by this adapter "
                                  "(nor by lmms-eval's llava)")


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


MODEL_REGISTRY_V2.register_manifest(ModelManifest(MODEL_NAME,
                                                  simple_class_path=f"tools.eval_lmms.{LlavaScratch.__name__}"),
                                    overwrite=True)


def main(argv=None):
    """lmms-eval's command line, --model defaulting to this adapter."""
    argv = sys.argv[1:] if argv is None else argv
    if "--model" not in argv:
        argv = ["--model", MODEL_NAME, *argv]
    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError as e:  # the --no-deps install carries the model API but not the evaluator's dependencies
        sys.exit(f"error: lmms-eval's command line needs its full install ({e}): pip install lmms-eval")
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
