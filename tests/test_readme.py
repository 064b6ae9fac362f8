"""The documented commands run as written: every command in README.md and docs/usage.md reaches an entry point
that exists, starts, and knows every flag the command passes.

Which commands: each `python ...` command in a ```bash block of the two pages (after joining `\\` continuations,
dropping `# comments` and splitting on `&&`; lines that run neither python nor torchrun are skipped), and the
script of each `torchrun ... FILE.py ...` command. Which are checked: this repository's entry points only,
`python FILE.py` (a file at the root) and `python -m tools.NAME` / `python -m toy.NAME`; `python -m pytest`,
`python -m sglang...`, `vllm`, `pip` are someone else's. How: the command itself is never run (its hub model names
download, its images and data sets are not on a test machine, `--device cuda` and torchrun want GPUs); its entry
point is run once with `--help`, offline, which needs none of them, and must exit 0 with a help text that names
every `--flag` the commands give it. One subprocess per distinct entry point.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "usage.md"]
OUR_PACKAGES = ("tools", "toy")
# entry points whose --help is another program's command line, and the module that command line needs
FOREIGN_CLI = {"-m tools.eval_lmms": "lmms_eval.__main__"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(entry point, arguments) of every python / torchrun command in the page's bash blocks."""
    found = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.search(r"\b(python|torchrun)\b", line.split("#")[0]):
                continue  # another program's line (curl's JSON body may span lines, which shlex cannot split alone)
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                segment, tokens = tokens[:cut], tokens[cut + 1:]
                entry = entry_point(segment)
                if entry:
                    found.append(entry)
    return found


def entry_point(segment: list[str]):
    if segment[:2] == ["python", "-m"] and len(segment) > 2:
        return f"-m {segment[2]}", segment[3:]
    if segment[:1] == ["python"] and len(segment) > 1:
        return segment[1], segment[2:]
    if segment[:1] == ["torchrun"]:
        scripts = [i for i, t in enumerate(segment) if t.endswith(".py")]
        return (segment[scripts[0]], segment[scripts[0] + 1:]) if scripts else None
    return None


def ours(entry: str) -> bool:
    if entry.startswith("-m "):
        return entry[3:].split(".")[0] in OUR_PACKAGES
    return "/" not in entry and entry.endswith(".py")


def documented() -> dict[str, set[str]]:
    """Entry point -> the flags the pages give it."""
    flags: dict[str, set[str]] = {}
    for page in PAGES:
        for entry, args in commands(page.read_text()):
            if ours(entry):
                flags.setdefault(entry, set()).update(a.split("=")[0] for a in args if a.startswith("--"))
    return flags


DOCUMENTED = documented()


def test_the_pages_commands_are_found():
    """The parser sees the commands a reader sees (a parser that finds nothing would pass every check below)."""
    readme = commands((ROOT / "README.md").read_text())
    entries = {e for e, _ in readme}
    assert {"train.py", "infer.py", "serve.py", "export.py", "-m tools.convert_gguf", "-m toy.ablations"} <= entries
    assert ("infer.py", ["photo.jpg", "What is shown in this image?"]) in readme
    assert "--resume" not in DOCUMENTED["train.py"]  # named in prose, not in a command
    assert {"--plan", "--gpus", "--gpu-memory", "--fsdp", "--recipe"} <= DOCUMENTED["train.py"]
    torchrun = [args for e, args in readme if e == "infer.py" and "llava-next-110b" in args]
    assert torchrun and "--nproc_per_node" not in DOCUMENTED["infer.py"]  # torchrun's flags are not the script's
    assert not ours("-m pytest") and not ours("-m sglang.launch_server") and ours("-m tools.eval")


def anchor(heading: str) -> str:
    """GitHub's id of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Each link to a file of the repository names one that exists, and each #anchor one of its headings."""
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert local
    for link in local:
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link!r}: no file {target}"
        if fragment:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: link {link!r}: no such heading"


@pytest.mark.parametrize("entry", sorted(DOCUMENTED))
def test_entry_point_help_knows_its_flags(entry):
    if entry in FOREIGN_CLI:
        pytest.importorskip(FOREIGN_CLI[entry], reason=f"{entry} --help is lmms-eval's, which needs its full install")
    argv = entry.split() if entry.startswith("-m ") else [entry]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"python {entry} --help: exit {run.returncode}\n{run.stderr[-2000:]}"
    unknown = sorted(f for f in DOCUMENTED[entry] if not re.search(re.escape(f) + r"(?![\w-])", run.stdout))
    assert not unknown, f"python {entry} --help does not know {unknown}, which the README / docs/usage.md pass it"


def test_the_toy_example_shows_its_picture_and_that_scenes_own_answer():
    # the README's example asks about eval_000000 of the default (seed 0) world: its picture is that scene drawn 4x,
    # and the answer it calls right is the scene's (the model's own answer beside it is measured: docs/toy-results.md)
    import numpy as np
    from PIL import Image

    from toy import world

    _, image, _, record = world.eval_sample(0, 0, world.ToyConfig())
    shown = Image.open(ROOT / "docs" / "toy-example.png").convert("RGB")
    assert shown.size == (4 * image.width, 4 * image.height)
    assert np.array_equal(np.asarray(shown), np.asarray(image.convert("RGB").resize(shown.size, Image.NEAREST)))
    text = (ROOT / "README.md").read_text()
    question, answer = re.search(r'eval_000000\.png "([^"]+)".*?the right answer is `(\w+)`', text, re.S).groups()
    assert record["conversations"][0]["value"].endswith(question) and answer == record["answer"] == "red"
