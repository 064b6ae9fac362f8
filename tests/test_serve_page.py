"""The web page serve.py serves at `/`, in a real browser: headless Chromium (Debian's `chromium`), driven over the
DevTools protocol, uploads an image, asks, and the streamed answer appears; a follow-up keeps the conversation.
The protocol's websocket is spoken with the standard library (a dozen lines: text frames, masked from the client)."""

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request

import pytest
from conftest import photo
from test_serve import reference, running_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """One page target of Chromium's DevTools protocol over a minimal websocket client."""

    def __init__(self, ws_url: str):
        host, _, path = ws_url.removeprefix("ws://").partition("/")
        name, port = host.split(":")
        self.sock = socket.create_connection((name, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the browser closed the DevTools connection"
            data += chunk
        return data

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self.read(2)
        n = b1 & 0x7F
        if n >= 126:  # 126: a 16-bit length follows, 127: a 64-bit one
            n = struct.unpack(">H", self.read(2))[0] if n == 126 else struct.unpack(">Q", self.read(8))[0]
        return b0 & 0x0F, self.read(n)  # the server never masks

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        # the mask bit with the length: in 7 bits, or 126 and 16 bits, or 127 and 64 bits
        size = (bytes([0x80 | n]) if n < 126 else struct.pack(">BH", 0xFE, n) if n < 65536
                else struct.pack(">BQ", 0xFF, n))
        self.sock.sendall(bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:  # skip events until the answer to this call
            opcode, data = self.frame()
            message = json.loads(data) if opcode == 1 else {}
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"the page never reached: {expression}"
            time.sleep(0.1)


@contextlib.contextmanager
def chromium(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=900,800", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        yield DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
    finally:
        stop(proc)


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_the_page_uploads_an_image_and_streams_the_answer(tiny, tmp_path, capsys):
    folder = tiny("onevision_qwen2")
    image = photo(320, 240, seed=5)
    image.save(tmp_path / "photo.png")
    ref = reference(folder, tmp_path, "What is in the picture?", image, max_tokens=12, capsys=capsys)
    with running_server(folder) as url, chromium(tmp_path) as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=url + "/")
        page.wait("document.readyState === 'complete' && document.getElementById('model').textContent !== ''")
        assert page.js("document.getElementById('model').textContent") == str(folder)
        root = page.call("DOM.getDocument")["root"]["nodeId"]
        node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        page.call("DOM.setFileInputFiles", nodeId=node, files=[str(tmp_path / "photo.png")])
        page.wait("document.querySelectorAll('#preview img').length === 1")

        def ask(question):
            page.js(f"document.getElementById('max').value = 12; document.getElementById('question').value = "
                    f"{json.dumps(question)}; document.getElementById('form').requestSubmit()")
            page.wait("document.body.dataset.state === 'idle' && document.querySelectorAll('.msg').length > 0 && "
                      "!document.querySelector('.msg:last-child').classList.contains('user')")

        ask("What is in the picture?")
        answers = page.js("[...document.querySelectorAll('.assistant span')].map(s => s.textContent)")
        assert answers == [ref["answer"]] and ref["answer"]
        assert page.js("document.querySelectorAll('.user img').length") == 1  # the image shows in the question
        ask("And the colours?")  # a follow-up: sent with the history, answered in a second bubble
        assert page.js("document.querySelectorAll('.error').length") == 0
        assert page.js("document.querySelectorAll('.assistant span').length") == 2
        assert page.js("document.querySelector('.assistant:last-child span').textContent") != ""
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(shot)
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
        print(f"screenshot: {tmp_path / 'page.png'}")
