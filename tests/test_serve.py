"""The server (serve.py) as its clients see it: a subprocess on 127.0.0.1, the `openai` client and plain HTTP.
Greedy answers equal infer.py's, alone or in a batch of 16 clients; bad requests are 400s naming the field and the
server answers the next good one; a dropped stream frees its batch row; a full queue is a 503."""

import base64
import contextlib
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
from conftest import ROOT, photo

import infer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen):
    """Ask a child process to end; kill it if it has not within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def running_server(folder, *extra, timeout=60, env=None):
    """serve.py in a subprocess on a free loopback port; yields its base URL, and stops it after."""
    port = free_port()
    log = open(folder.parent / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(folder), "--host", "127.0.0.1", "--port",
                             str(port), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"serve.py exited: {open(log.name).read()[-2000:]}"
            assert time.monotonic() < deadline, "serve.py did not answer /health in time"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        log.seek(0)
        print(log.read()[-3000:])  # shown by pytest when the test fails
        log.close()


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reference(folder, tmp_path, question, image=None, max_tokens=8, capsys=None, *extra) -> dict:
    """infer.py's own answer (--json) for the same image and question: the single-run greedy reference."""
    args = [question, "--model", str(folder), "--json", "--max-new-tokens", str(max_tokens), *extra]
    if image is not None:
        path = tmp_path / f"ref-{id(image)}.png"
        image.save(path)
        args = [str(path), *args]
    capsys.readouterr()
    infer.main(args)
    return json.loads(capsys.readouterr().out)


def ask(url, question, image=None, max_tokens=8, stream=False, **extra) -> dict:
    """POST one request; -> {"status", "text", "ids", "usage", "finish"} (a stream is put back together)."""
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream,
            "return_token_ids": True, **extra}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        if r.status_code != 200:
            return {"status": r.status_code, "body": r.json()}
        choice = r.json()["choices"][0]
        return {"status": 200, "text": choice["message"]["content"], "ids": choice["token_ids"],
                "usage": r.json()["usage"], "finish": choice["finish_reason"]}
    text, ids, finish, done = "", None, None, False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            ids, finish = choice.get("token_ids", ids), choice["finish_reason"] or finish
    assert done, "the stream did not end with data: [DONE]"
    return {"status": 200, "text": text, "ids": ids, "finish": finish}


@pytest.fixture(scope="module")
def qwen(tiny):
    return tiny("onevision_qwen2")


@pytest.fixture(scope="module")
def server(qwen, tmp_path_factory):
    images = tmp_path_factory.mktemp("served_images")
    photo(40, 60, seed=3).save(images / "inside.png")
    with running_server(qwen, "--image-dir", str(images)) as url:
        yield url


def test_the_openai_client_gets_infer_py_answer(server, qwen, tmp_path, capsys):
    openai = pytest.importorskip("openai")
    image = photo(70, 30, seed=7)
    ref = reference(qwen, tmp_path, "What is it?", image, max_tokens=8, capsys=capsys)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [str(qwen)]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "What is it?"}]}]
    done = client.chat.completions.create(model=str(qwen), messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert done.choices[0].message.content == ref["answer"]
    assert done.choices[0].model_extra["token_ids"] == ref["output_token_ids"]
    # usage counts the image's tokens: infer.py's prompt has one placeholder where the image's 417 go
    visual = sum(ref["image_tokens"])
    assert done.usage.prompt_tokens == len(ref["prompt_token_ids"]) - 1 + visual and visual > 100
    assert done.usage.completion_tokens == len(ref["output_token_ids"])

    chunks = list(client.chat.completions.create(model=str(qwen), messages=messages, max_completion_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["answer"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1

    # a follow-up turn: the history renders in the model's template, as infer.py would render it
    follow = messages + [{"role": "assistant", "content": ref["answer"]}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=str(qwen), messages=follow, max_tokens=5)
    assert second.usage.prompt_tokens > done.usage.prompt_tokens + 5
    assert second.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_answer_and_a_seeded_sample_is_infer_py_sample(server, qwen, tmp_path, capsys):
    ref = reference(qwen, tmp_path, "Caption it.", None, 20, capsys)
    stop = ref["answer"][4:6]
    expected = ref["answer"][:ref["answer"].find(stop)].strip()
    for stream in (False, True):
        got = ask(server, "Caption it.", max_tokens=20, stream=stream, stop=[stop, "never in it"])
        assert (got["text"], got["finish"]) == (expected, "stop")
    sampled = reference(qwen, tmp_path, "Caption it.", None, 12, capsys, "--temperature", "0.9", "--seed", "5")
    got = ask(server, "Caption it.", max_tokens=12, temperature=0.9, seed=5)
    assert got["ids"] == sampled["output_token_ids"] and got["ids"] != ref["output_token_ids"][:12]
    # without a seed each sampled request draws its own (OpenAI's behaviour): two 12-token samples of a random
    # model's near-uniform next-token distribution differ
    unseeded = [ask(server, "Caption it.", max_tokens=12, temperature=1.0, ignore_eos=True)["ids"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_sixteen_concurrent_clients_get_their_single_run_answers(server, qwen, tmp_path, capsys):
    """16 clients x 4 requests, text and images, 2 to 24 new tokens, streamed or not, greedy: every answer equals
    infer.py's for the same request, and the server did decode many of them in one batch."""
    requests = [("Hi", None, 24), ("What colour is the sky at night?", None, 6),
                ("Describe.", photo(50, 40, seed=1), 3),
                ("Count the objects.", photo(30, 80, seed=2), 16), ("Why?", None, 2), ("Caption it.", None, 20),
                ("Where is the sun?", photo(64, 64, seed=4), 10), ("One word.", None, 12)]
    refs = [reference(qwen, tmp_path, q, im, n, capsys=capsys) for q, im, n in requests]
    results, errors = {}, []

    def client(c):
        try:
            for r in range(4):
                k = (c * 3 + r) % len(requests)
                q, im, n = requests[k]
                results[c, r] = (k, ask(server, q, im, n, stream=(c + r) % 2 == 1))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 64
    for (c, r), (k, got) in sorted(results.items()):
        assert (got["ids"], got["text"]) == (refs[k]["output_token_ids"], refs[k]["answer"]), (c, r, requests[k][0])
    health = httpx.get(f"{server}/health").json()
    assert health["running"] == 0 and health["queued"] == 0
    assert health["peak_running"] >= 4  # they were decoded together, not one after another


def tiny_png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels and holds none: a decompression bomb's first bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_requests_are_400s_naming_the_field_and_the_server_goes_on(server, qwen, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    user = lambda *parts: {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}  # noqa: E731
    text = {"type": "text", "text": "What is it?"}
    image = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    b64 = lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()  # noqa: E731
    where = "messages[0].content[1].image_url"
    cases = [  # (body, param, words in the message)
        (b"{not json", "body", "not valid JSON"),
        ([1, 2], "body", "JSON object"),
        ({**good, "n": 2}, "n", "n = 1"),
        ({**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({**good, "max_tokens": 0}, "max_tokens", "[1, "),
        ({**good, "max_tokens": -5}, "max_tokens", "[1, "),
        ({**good, "max_tokens": None, "max_completion_tokens": 10 ** 6}, "max_completion_tokens", "context window"),
        ({**good, "temperature": -1}, "temperature", "[0, 2]"),
        ({**good, "top_p": "high"}, "top_p", "a number"),
        ({**good, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**good, "stop": "x" * 257}, "stop", "1-256 characters"),  # its hold-back check costs length squared
        ({**good, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({**good, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
        ({**good, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        (b"[" * 100_000 + b"]" * 100_000, "body", "not valid JSON"),  # deeper than the parser recurses
        ({"max_tokens": 4}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role", "role"),
        (user(text, {"type": "video", "video": "x"}), "messages[0].content[1]", "image_url"),
        (user(text, image("data:image/png,rawbytes")), where, "base64"),
        (user(text, image(b64(b"this is not a picture"))), where, "unreadable image"),
        (user(text, image(b64(tiny_png_header(40000, 40000)))), where, "image too large"),
        (user(text, image("https://example.com/cat.png")), where, "network"),
        (user(text, image("/etc/hostname")), where, "outside --image-dir"),
        (user(text, image("../served_images/../x.png")), where, "outside --image-dir"),
        (user(text, image("nope.png")), where, "missing image"),
        (user(text, image("in\0side.png")), where, "NUL"),
        # the request's pixel budget, read from the second image's header before it is decoded
        (user(text, image(data_url(photo(100, 100, seed=1))), image(b64(tiny_png_header(8200, 8192)))),
         "messages[0].content[2].image_url", "67,108,864 pixels in all"),
        # two images, each padded to a square (several images in a prompt): a 1 x 20000 strip would be 4 x 10^8 pixels
        (user(text, *[image(data_url(photo(1, 20000, seed=1)))] * 2), "messages", "padded to a square"),
        # 3,000 images of 1 x 1: refused by their token count before any is processed
        (user(text, *[image(data_url(photo(1, 1, seed=1)))] * 3000), "messages", "images alone are"),
        (user({"type": "text", "text": " ".join(map(str, range(20000)))}), "messages", "reads at most 32768"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]}, "messages",
         "last message"),
        (user({"type": "text", "text": "<image> and <image>?"}), "messages[0].content", "placeholders"),
    ]
    json_type = {"content-type": "application/json"}
    statuses = [({**good, "model": "gpt-4o"}, {}, 404, "model", "not served here"),  # OpenAI's and vLLM's status
                (json.dumps(good).encode(), {"content-type": "text/plain"}, 415, "body", "application/json"),
                (b" " * (65 << 20), json_type, 413, "body", "larger than 64 MB")]
    assert len(cases) >= 20
    for body, headers, status, param, words in [(body, json_type, 400, param, words) for body, param, words in cases
                                                ] + statuses:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{server}/v1/chat/completions", timeout=60, headers=headers, **kwargs)
        assert r.status_code == status, (param, r.text[:500])
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    ok = ask(server, "What is it?", image=None, max_tokens=4)
    ref = reference(qwen, tmp_path, "What is it?", None, 4, capsys=capsys)
    assert (ok["status"], ok["ids"]) == (200, ref["output_token_ids"])
    # a file under --image-dir is read, by a relative path or a file:// one
    inside = {"messages": [{"role": "user", "content": [text, image("inside.png")]}], "max_tokens": 2}
    assert httpx.post(f"{server}/v1/chat/completions", json=inside, timeout=60).status_code == 200


def wait_health(url, timeout=30, **want) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if all(health[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_a_dropped_stream_frees_its_row(server, qwen, tmp_path, capsys):
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 20000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):  # the role chunk and a few tokens
            next(lines)
        assert wait_health(server, running=1)["running"] == 1
    # the client has gone: its row leaves the batch at the next token
    assert wait_health(server, running=0, queued=0)["running"] == 0
    ref = reference(qwen, tmp_path, "Hi", None, 5, capsys=capsys)
    assert ask(server, "Hi", max_tokens=5)["ids"] == ref["output_token_ids"]


def test_a_dropped_request_frees_its_row_while_tokens_flow(server):
    """Not streamed: the client gives up while the answer is still coming, one token after another; the server
    notices within about a second, though it is never idle long enough to time out waiting."""
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 30000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=2))
    assert wait_health(server, running=0, queued=0, timeout=10)["running"] == 0


def test_a_full_queue_answers_503(qwen):
    with running_server(qwen, "--max-batch", "1", "--max-queue", "1") as url:
        long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 20000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            assert wait_health(url, running=1)["running"] == 1  # the one row is taken
            # a waiting request whose client gives up leaves the queue's count, and its place goes to the next one
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                           timeout=httpx.Timeout(30, read=2))
            assert wait_health(url, queued=0, timeout=5)["queued"] == 0  # its handler checks its client each second
            waiting = {}
            thread = threading.Thread(target=lambda: waiting.update(ask(url, "Hi", max_tokens=3)))
            thread.start()
            assert wait_health(url, queued=1)["queued"] == 1
            full = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                              timeout=30)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            error = full.json()["error"]
            assert error["type"] == "server_overloaded" and "--max-queue" in error["message"]
        thread.join(60)  # the stream closed: the waiting request takes the row and is answered
        assert waiting["status"] == 200 and 1 <= len(waiting["ids"]) <= 3
        assert wait_health(url, running=0, queued=0)["running"] == 0


def test_without_fastapi_it_says_what_to_install():
    code = ("import sys, runpy; sys.modules['uvicorn'] = None; sys.argv = ['serve.py']; "
            "runpy.run_path('serve.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: serve.py needs FastAPI and uvicorn (uvicorn is missing): "
                                                "pip install -r requirements-serve.txt"]
