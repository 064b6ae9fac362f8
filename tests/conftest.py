"""Shared test fixtures: the repo root and tests/ on sys.path, photo-like test images, the original LLaVA code."""

import ast
import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: resampling filters give distinct results on it, unlike flat colours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1) * 200
    noise = rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def original_llava(tmp_path_factory):
    """The original LLaVA code (haotian-liu/LLaVA as released on PyPI as llava-torch 1.2.2.post1, the LLaVA-1.6
    inference code): its mm_utils and conversation modules and the unpad_image function of llava_arch, loaded
    without the rest of the package (which needs an old transformers)."""
    dest = tmp_path_factory.mktemp("llava_torch")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llava-torch==1.2.2.post1",
                           "-d", str(dest)], capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(f"llava-torch could not be downloaded from PyPI: {done.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        wanted = ("llava/mm_utils.py", "llava/constants.py", "llava/conversation.py", "llava/model/llava_arch.py")
        z.extractall(dest, [n for n in z.namelist() if n in wanted])
    package = types.ModuleType("llava")
    package.__path__ = [str(dest / "llava")]
    sys.modules.setdefault("llava", package)
    for name in ("constants", "mm_utils", "conversation"):
        spec = importlib.util.spec_from_file_location(f"llava.{name}", dest / "llava" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"llava.{name}"] = module
        spec.loader.exec_module(module)
    source = (dest / "llava/model/llava_arch.py").read_text()
    tree = ast.parse(source)
    unpad = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "unpad_image")
    namespace = {}
    exec(compile(ast.Module([unpad], []), "llava_arch.py", "exec"), namespace)
    return types.SimpleNamespace(mm_utils=sys.modules["llava.mm_utils"], conversation=sys.modules["llava.conversation"],
                                 unpad_image=namespace["unpad_image"])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) -> folder of a tiny random transformers checkpoint (built once per session); see tiny_checkpoints."""
    import tiny_checkpoints

    root, built = tmp_path_factory.mktemp("tiny"), {}

    def get(name):
        if name not in built:
            built[name] = tiny_checkpoints.build(name, root / name)
        return built[name]

    return get
