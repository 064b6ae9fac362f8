"""Model folders we did not make: a tokenizer that knows ids past the embedding, a projector file that is not
there, shard names that leave the folder, configs that build no model, pickles, towers too shallow for their
feature layer, and unreadable chat templates. Each is refused with one line naming the file or key, what was
expected and what to do; none reaches a traceback, an IndexError on the embedding or a silently fresh projector."""

import json
import shutil
import types

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

import infer
import serve
from chat_template import load_tokenizer


def refused(capsys, run, *words) -> str:
    """`run` must end the program with one line "error: ..." holding each of `words`, and print no traceback."""
    with pytest.raises(SystemExit) as e:
        run()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err
    return message


def copy(tiny, tmp_path, name="next_llama"):
    return shutil.copytree(tiny(name), tmp_path / name)


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer that knows ids past the model's embedding (the llava-hf tokenizer.json that original-layout presets
# borrow adds <image> = 32000 and <pad> = 32001 to a 32000-row embedding)


@pytest.fixture
def past_vocab_folder(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<spare>", special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    assert tok.token_to_id("<spare>") == 320 == json.loads((folder / "config.json").read_text())["text_config"][
        "vocab_size"]
    return folder


def test_infer_refuses_a_token_past_the_embedding(past_vocab_folder, capsys):
    refused(capsys, lambda: infer.main(["Say <spare> now", "--model", str(past_vocab_folder), "--max-new-tokens", "2"]),
            "'<spare>' (id 320)", "320 rows", "remove that text")
    # the tokenizer being larger than the model is no fault in itself: a prompt without the token is answered
    infer.main(["Say hi", "--model", str(past_vocab_folder), "--max-new-tokens", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["output_token_ids"]


def test_serve_answers_400_for_a_token_past_the_embedding(past_vocab_folder):
    from convert import load_pretrained

    model, folder = load_pretrained(str(past_vocab_folder))
    server = types.SimpleNamespace(names={None}, name="m", model=model, tokenizer=load_tokenizer(folder, str(folder)),
                                   template="llava_v1", image_dir=None)
    with pytest.raises(serve.BadRequest) as e:
        serve.prepare({"messages": [{"role": "user", "content": "Say <spare> now"}]}, server)
    assert e.value.status == 400 and e.value.param == "messages" and "'<spare>' (id 320)" in e.value.message
    seq, _, _ = serve.prepare({"messages": [{"role": "user", "content": "Say hi"}]}, server)
    assert max(seq.ids) < 320


def test_the_model_refuses_an_id_past_its_embedding(tiny):
    from convert import load_pretrained

    model, _ = load_pretrained(str(tiny("next_llama")))
    with pytest.raises(ValueError, match="token id 320 is past the model's 320 embedding rows"):
        model(torch.tensor([[1, 5, 320]]))
