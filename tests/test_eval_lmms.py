"""tools/eval_lmms.py against the real lmms-eval package (CI installs it with --no-deps): the model registry finds the
adapter by name, lmms-eval's own argument parsing builds it, and answers to lmms-eval `Instance` requests equal
`generate.generate` run on each prompt alone."""

import pytest
import torch
from conftest import photo

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (CI installs it with --no-deps)")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from tools import eval_lmms  # noqa: E402
from anyres import process_image  # noqa: E402
from data import render_prompt, tokenize  # noqa: E402
from generate import generate  # noqa: E402
from model import KVCache  # noqa: E402

TASK, SPLIT = "toy_vqa", "test"
DOCS = {0: {"image": photo(70, 30, seed=1), "question": "What is it?"},
        1: {"image": photo(30, 60, seed=2), "question": "Which colour?"},
        2: {"image": photo(40, 40, seed=3), "question": "How many?"}}


def doc_to_visual(doc):
    return [doc["image"]]


def request(doc_id, gen_kwargs, kind="generate_until", continuation=None):
    context = DOCS[doc_id]["question"]
    args = ((context, gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT) if kind == "generate_until"
            else (context, continuation, doc_to_visual, doc_id, TASK, SPLIT))
    return Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def adapter(tiny):
    # as lmms-eval's evaluator builds a model: the class from the registry, --model_args through its parser
    cls = get_model(eval_lmms.MODEL_NAME)
    assert cls is eval_lmms.LlavaScratch
    model = cls.create_from_arg_string(f"pretrained={tiny('next_llama')},max_new_tokens=64",
                                       {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    model.task_dict = {TASK: {SPLIT: DOCS}}  # what the evaluator fills in
    return model


def alone(adapter, doc_id, max_new_tokens):
    """The answer generate.generate gives this document on its own: "<image>\\n" + question in the model's template."""
    image = process_image(DOCS[doc_id]["image"], adapter.model.cfg)
    prompt = render_prompt(adapter.template, [("user", "<image>\n" + DOCS[doc_id]["question"])])
    ids = tokenize(adapter.tokenizer, prompt, [image.num_tokens])
    out = list(generate(adapter.model, ids, [image], max_new_tokens=max_new_tokens, stop_ids=adapter.stop))
    return out, adapter.tokenizer.decode([t for t in out if t not in adapter.stop]).strip()


def test_generate_until_equals_one_at_a_time(adapter):
    assert (adapter.batch_size, adapter.max_new_tokens, adapter.template) == (2, 64, "vicuna_v1")
    # two gen_kwargs groups, the first split into batches of 2 and 1: answers still come back in request order
    short = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    longer = {"max_new_tokens": 7, "do_sample": False}
    requests = [request(0, short), request(1, longer), request(2, short), request(1, short)]
    answers = adapter.generate_until(requests)
    expected = [alone(adapter, 0, 4)[1], alone(adapter, 1, 7)[1], alone(adapter, 2, 4)[1], alone(adapter, 1, 4)[1]]
    assert answers == expected
    assert answers[1] != answers[3]  # 7 new tokens against 4: the groups kept their own settings


def test_until_cuts_the_answer():
    assert eval_lmms.cut_at("Paris.\n\nIt is the capital", ["\n\n"]) == "Paris."
    assert eval_lmms.cut_at("a. b", ["", "."]) == "a"


def text_request(context, continuation):
    return Instance("loglikelihood", (context, continuation, None, 0, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": 0, "repeats": 1})


def test_loglikelihood_is_the_mean_token_loss(adapter):
    """The loss of a continuation equals -mean log p of its tokens fed one at a time through the KV cache (another
    path through the model than the adapter's single forward), with the image in the context."""
    tokenizer, model = adapter.tokenizer, adapter.model
    image = process_image(DOCS[0]["image"], model.cfg)
    prompt = render_prompt(adapter.template, [("user", "<image>\n" + DOCS[0]["question"])])
    ids = tokenize(tokenizer, prompt, [image.num_tokens])
    target = tokenizer.encode("blue sky", add_special_tokens=False).ids
    assert len(target) >= 2
    cache = KVCache(model.cfg.text, 1, len(ids) + len(target), torch.float32, "cpu")
    with torch.inference_mode():
        logits = [model(torch.tensor([ids]), [image], cache=cache, num_logits=1)[0, -1]]
        for t in target[:-1]:
            logits.append(model(torch.tensor([[t]]), cache=cache)[0, -1])
    logp = torch.stack([torch.log_softmax(l.float(), -1)[t] for l, t in zip(logits, target)])
    greedy = all(int(l.argmax()) == t for l, t in zip(logits, target))
    [(loss, is_greedy)] = adapter.loglikelihood([request(0, None, "loglikelihood", "blue sky")])
    assert loss == pytest.approx(float(-logp.mean()), rel=1e-5) and is_greedy == greedy


def test_loglikelihood_prefers_the_greedy_token(adapter):
    """Over single-token continuations, the greedy token has the smallest loss and the only is_greedy=True. Text-only
    contexts are tried until the random model's greedy token is one that decodes and encodes back to itself."""
    tokenizer = adapter.tokenizer
    candidates = [t for t in range(3, 300)
                  if tokenizer.encode(tokenizer.decode([t]), add_special_tokens=False).ids == [t]]
    for word in ["Say a word.", "Hello", "Name a colour.", "Count.", "Why?", "Go on", "And then?", "Yes or no?",
                 "Pick"]:
        ids = tokenize(tokenizer, render_prompt(adapter.template, [("user", word)]))
        greedy = next(generate(adapter.model, ids, max_new_tokens=1))
        if greedy in candidates:
            break
    else:
        pytest.fail("no context whose greedy token round-trips through the tokenizer")
    others = [t for t in candidates if t != greedy][:5]
    results = adapter.loglikelihood([text_request(word, tokenizer.decode([t])) for t in [greedy, *others]])
    losses, is_greedy = zip(*results)
    assert is_greedy == (True,) + (False,) * len(others)
    assert min(losses) == losses[0] and all(loss > 0 for loss in losses)


def test_multi_round_is_refused(adapter):
    with pytest.raises(NotImplementedError):
        adapter.generate_until_multi_round([])
