"""Chat and question files (chat.py): a chat turn reuses the KV cache yet answers exactly as a fresh generation
on the whole history; question files give the one-at-a-time answers in batches and resume where they stopped."""

import io
import json

import pytest
import torch
from conftest import photo

import generate as generation

import infer
import chat
from convert import load_pretrained
from chat_template import load_tokenizer
from model import IMAGE_TOKEN


@pytest.fixture(scope="module")
def next_llama(tiny):
    model, folder = load_pretrained(str(tiny("next_llama")))
    return model, load_tokenizer(folder, str(folder)), folder


def test_later_turns_prefill_only_their_tokens_and_match_a_fresh_generation(next_llama):
    model, tokenizer, _ = next_llama
    session = chat.Session(model, tokenizer, "vicuna_v1", stop=set())
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    prefilled = []
    forward = model.language_model.forward
    model.language_model.forward = lambda x, *a, **k: prefilled.append(x.shape[1]) or forward(x, *a, **k)
    try:
        first = list(session.ask("What is it?", [photo(70, 30, seed=1)], max_new_tokens=4))
        n1 = len(session.ids)
        second = list(session.ask("And the colour?", max_new_tokens=4))
        n2 = len(session.ids) - len(second)
        third = list(session.ask("Compare them.", [photo(30, 50, seed=2)], max_new_tokens=4))
    finally:
        hook.remove()
        del model.language_model.forward
    # each image's crops went through the tower once, in the turn that brought it
    assert calls == [im.pixels.shape[0] for im in session.images] and len(calls) == 2
    # turn 2 feeds turn 1's last sampled token and its own text; no image, no history
    turn2 = session.ids[n1:n2]
    assert prefilled[4] == 1 + len(turn2)  # turn 1 was a prefill and 3 single-token steps
    assert tokenizer.decode(turn2, skip_special_tokens=False) == "</s>USER: And the colour? ASSISTANT:"

    history = session.ids[:n2]  # everything up to turn 2's generation prompt
    assert IMAGE_TOKEN in history and len(first) == len(second) == 4
    assert list(generation.generate(model, history, session.images[:1], max_new_tokens=4)) == second
    history3 = session.ids[:len(session.ids) - len(third)]
    assert list(generation.generate(model, history3, session.images, max_new_tokens=4)) == third


def test_turn_text_follows_the_template_and_the_system_message(next_llama):
    model, tokenizer, _ = next_llama
    qwen = chat.Session(model, tokenizer, "qwen_1_5", stop=set(), system="Be brief.")
    assert qwen.turn_text("<image>\nHi") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nHi"
                                             "<|im_end|>\n<|im_start|>assistant\n")
    qwen.ids, qwen.closed = [1, 2], True  # an answer that ended with <|im_end|>: only the newline after it is left
    assert qwen.turn_text("More?") == "\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"
    qwen.closed = False  # cut off by --max-new-tokens: the turn is closed for it
    assert qwen.turn_text("More?").startswith("<|im_end|>\n<|im_start|>user\n")
    mistral = chat.Session(model, tokenizer, "mistral_instruct", stop=set(), system="Be brief.")
    assert mistral.turn_text("<image>\nHi") == "[INST] Be brief.\n\n<image>\nHi [/INST]"


def test_chat_from_piped_stdin(tiny, tmp_path, monkeypatch, capsys):
    folder = tiny("next_llama")
    photo(70, 30, seed=1).save(tmp_path / "a.png")
    photo(30, 50, seed=2).save(tmp_path / "b.png")
    stdin = f"/image {tmp_path / 'nope.png'}\n/image {tmp_path / 'b.png'}\nAnd this?\n/reset\nWhat is it?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    infer.main([str(tmp_path / "a.png"), "What is it?", "--chat", "--model", str(folder), "--max-new-tokens", "4",
                "--ignore-eos", "--template", "llava_v1"])
    out, err = capsys.readouterr()
    answers = out.splitlines()
    assert len(answers) == 3 and answers[0] == answers[2]  # /reset: the same first question, the same answer
    assert "missing image" in err and "nope.png" in err

    infer.main([str(tmp_path / "a.png"), "What is it?", "--model", str(folder), "--max-new-tokens", "4", "--ignore-eos",
                "--template", "llava_v1", "--json"])
    assert json.loads(capsys.readouterr().out)["answer"] == answers[0].strip()


@pytest.fixture
def question_file(tmp_path):
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(70, 30), (30, 70), (40, 40)]):
        photo(*size, seed=i).save(tmp_path / "images" / f"{i}.png")
    rows = [{"question_id": q, "image": f"{q % 3}.png",
             "text": f"Question {q}?\nAnswer the question using a single word."}
            for q in range(5)] + [{"question_id": "text-only", "text": "Say hi."}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_file(folder, questions, output, *extra):
    infer.main(["--batch-file", str(questions), "--image-folder", str(questions.parent / "images"), "--output",
                str(output), "--model", str(folder), "--max-new-tokens", "5", "--ignore-eos", *extra])
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_question_file_batches_give_the_one_at_a_time_answers(tiny, question_file, tmp_path, capsys):
    folder = tiny("onevision_qwen2")
    batched = run_file(folder, question_file, tmp_path / "batched.jsonl", "--batch-size", "4")
    alone = run_file(folder, question_file, tmp_path / "alone.jsonl", "--batch-size", "1")
    assert [r["question_id"] for r in batched] == [0, 1, 2, 3, 4, "text-only"]
    assert batched == alone
    assert set(batched[0]) == {"question_id", "prompt", "text", "model_id"}
    assert batched[0]["prompt"] == "Question 0?\nAnswer the question using a single word."
    assert batched[0]["model_id"] == folder.name
    capsys.readouterr()
    infer.main([str(question_file.parent / "images" / "1.png"), "Question 1?\nAnswer the question using a single word.",
                "--model", str(folder), "--max-new-tokens", "5", "--ignore-eos", "--json"])
    assert json.loads(capsys.readouterr().out)["answer"] == batched[1]["text"]


def test_question_file_resumes_after_the_answers_it_has(tiny, question_file, tmp_path, monkeypatch):
    folder = tiny("onevision_qwen2")
    full = run_file(folder, question_file, tmp_path / "full.jsonl", "--batch-size", "3")
    partial = tmp_path / "partial.jsonl"  # two answers, then a line torn by a killed run
    partial.write_text(json.dumps(full[3]) + "\n" + json.dumps(full[0]) + "\n" + '{"question_id": 1, "te')
    asked = []
    generate_batch = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch",
                        lambda m, prompts, *a, **k: asked.append(len(prompts)) or generate_batch(m, prompts, *a, **k))
    resumed = run_file(folder, question_file, partial, "--batch-size", "3")
    assert sum(asked) == 4  # questions 1, 2, 4 and text-only
    assert sorted(map(str, (r["question_id"] for r in resumed))) == sorted(map(str, (r["question_id"] for r in full)))
    assert {str(r["question_id"]): r for r in resumed} == {str(r["question_id"]): r for r in full}


def test_question_file_errors_are_one_line(tiny, tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "Hi"}\n{"image": "x.png", "text": "Hi"}\n')
    with pytest.raises(SystemExit, match=r"q.jsonl:2: missing question_id"):
        infer.main(["--batch-file", str(bad), "--output", str(tmp_path / "a.jsonl"),
                    "--model", str(tiny("next_llama"))])
    bad.write_text('{"question_id": 1, "image": "gone.png", "text": "Hi"}\n')
    with pytest.raises(SystemExit, match=r"question 1: missing image: .*gone.png"):
        infer.main(["--batch-file", str(bad), "--output", str(tmp_path / "a.jsonl"),
                    "--model", str(tiny("next_llama"))])
    with pytest.raises(SystemExit, match="needs --output"):
        infer.main(["--batch-file", str(bad), "--model", str(tiny("next_llama"))])
