"""Run by tests/test_tensor_parallel.py as `torchrun --nproc_per_node N tests/tp_worker.py OUT IMAGE FOLDER...`.

For each checkpoint folder: the model split over the ranks (tensor_parallel.py), then `cases` (full-sequence logits
and greedy tokens of a text-only and an image prompt), which rank 0 saves to OUT; then the same folder through
infer.main --json, whose single JSON object is rank 0's only stdout line. `--compile` in the arguments is passed on.
"""

import functools
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import generate as generation

import distributed  # noqa: E402
import infer  # noqa: E402
import tensor_parallel  # noqa: E402
from anyres import process_image  # noqa: E402
from convert import load_pretrained  # noqa: E402
from data import load_image  # noqa: E402
from model import IMAGE_TOKEN  # noqa: E402


def cases(model, image_path) -> dict:
    """{"text" | "image": (logits (1, T, V), greedy tokens)} of two fixed prompts."""
    image = process_image(load_image(image_path), model.cfg)
    out = {}
    for name, ids, images in (("text", [5, 6, 7, 8, 9, 10], None),
                              ("image", [5, 6] + [IMAGE_TOKEN] * image.num_tokens + [7, 8, 9], [image])):
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), images)
        out[name] = (logits, list(generation.generate(model, ids, images, max_new_tokens=6)))
    return out


def cli_args(folder, image_path) -> list[str]:
    return [str(image_path), "Describe.", "--model", str(folder), "--json", "--max-new-tokens", "6", "--ignore-eos"]


def main(argv):
    flags = [a for a in argv if a.startswith("--")]
    out, image_path, *folders = [a for a in argv if not a.startswith("--")]
    results = {}
    for folder in folders:
        model, _ = load_pretrained(folder, prepare=functools.partial(tensor_parallel.shard_decoder, device="cpu"))
        tensor_parallel.shard_tied_head(model)
        results[folder] = cases(model, image_path)
    if distributed.rank() == 0:
        torch.save(results, out)
    # one process group for the whole run: infer.main ends its group (distributed.finish), and a group created
    # again on the same port can race the old one's shutdown, which no real run (one infer.main per process) does
    finish, distributed.finish = distributed.finish, lambda: None
    for folder in folders:
        infer.main(cli_args(folder, image_path) + flags)
    finish()


if __name__ == "__main__":
    main(sys.argv[1:])
