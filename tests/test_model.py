"""Parity with transformers, the reference: tiny random checkpoints saved by transformers, loaded by our code,
give the same logits (fp32, max |difference| <= 1e-4), the same greedy tokens, the same pixels and token counts.
The same weights rewritten into the original LLaVA layout load to the same model."""

import pytest
import torch
from conftest import photo

import tiny_checkpoints as tc
from tiny_releases import to_original_layout
from anyres import process_image, process_images, process_video, video_tokens
from convert import load_pretrained
from generate import generate
from model import IMAGE_TOKEN, KVCache

TOL = 1e-4
# wide, tall, square-ish and wider than 3:1 (so the 84x28 canvas is chosen and unpad cuts rows)
SIZES = [(45, 30), (30, 70), (40, 40), (130, 36)]


@pytest.fixture(scope="module")
def models(tiny):
    cache = {}

    def get(name):
        if name not in cache:
            path = tiny(name)
            ours, _ = load_pretrained(str(path), compat="transformers")
            cache[name] = (tc.load_reference(path), tc.make_processor(name), ours)
        return cache[name]

    return get


def prompt_ids(name, counts, text=(5, 6, 7, 8, 9)):
    """[BOS] 5 6 <image>*n0 [<image>*n1] 7 8 9 as (ours, theirs): ours holds IMAGE_TOKEN, theirs the vocab id."""
    bos = [tc.LLAMA_TOKENS["<s>"]] if "qwen" not in name else []
    ours = bos + list(text[:2]) + [IMAGE_TOKEN] * sum(counts) + list(text[2:])
    theirs = [tc.IMAGE_TOKEN_ID[name] if t == IMAGE_TOKEN else t for t in ours]
    return torch.tensor([ours]), torch.tensor([theirs])


def reference_logits(ref, name, ids, pixels=None):
    kwargs = {k: v for k, v in (pixels or {}).items()
              if k in ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")}
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


def check_pixels(name, processed, pixels):
    """Each image's crops equal the processor's, which pads every image to the batch's largest crop count."""
    for i, im in enumerate(processed):
        theirs = pixels["pixel_values"][i]
        theirs = theirs[: im.pixels.shape[0]] if theirs.dim() == 4 else theirs[None]
        assert torch.equal(im.pixels, theirs), f"{name}: pixels of image {i} differ"


@pytest.mark.parametrize("name", tc.NAMES)
def test_text_only_logits(models, name):
    ref, _, ours = models(name)
    ids = torch.randint(3, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    theirs = reference_logits(ref, name, ids)
    with torch.no_grad():
        mine = ours(ids)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", tc.NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_single_image_logits_pixels_and_counts(models, name, size):
    ref, processor, ours = models(name)
    image = photo(*size, seed=size[0])
    processed = [process_image(image, ours.cfg)]
    pixels = dict(processor(images=image, return_tensors="pt"))
    check_pixels(name, processed, pixels)
    assert processed[0].num_tokens == tc.image_token_count(ref, pixels)
    mine_ids, their_ids = prompt_ids(name, [processed[0].num_tokens])
    theirs = reference_logits(ref, name, their_ids, pixels)
    with torch.no_grad():
        mine = ours(mine_ids, processed)
    assert (mine - theirs).abs().max() <= TOL


MULTI = [photo(45, 30, seed=1), photo(20, 75, seed=2), photo(33, 33, seed=3)]


@pytest.mark.parametrize("name,count", [("llava15_llama", 2), ("next_mistral", 2), ("next_qwen2", 3),
                                        ("onevision_qwen2", 2), ("onevision_qwen2", 3)])
def test_multi_image_logits_pixels_and_counts(models, name, count):
    """Several images in one prompt. OneVision pads each to a mean-colour square (n*n + 1 tokens), as the original
    trains and as transformers does for a sample of several images (a nested list); transformers' LLaVA-NeXT tiles
    every image, which our compat="transformers" follows."""
    ref, processor, ours = models(name)
    images = MULTI[:count]
    processed = process_images(images, ours.cfg)
    pixels = dict(processor(images=[images] if name == "onevision_qwen2" else images, return_tensors="pt"))
    check_pixels(name, processed, pixels)
    assert sum(p.num_tokens for p in processed) == tc.image_token_count(ref, pixels)
    if name == "onevision_qwen2":
        assert [p.num_tokens for p in processed] == [9 * 9 + 1] * count
    mine_ids, their_ids = prompt_ids(name, [p.num_tokens for p in processed])
    theirs = reference_logits(ref, name, their_ids, pixels)
    with torch.no_grad():
        mine = ours(mine_ids, processed)
    assert (mine - theirs).abs().max() <= TOL
    if name == "onevision_qwen2":  # and the same greedy continuation
        greedy = list(generate(ours, mine_ids[0].tolist(), processed, max_new_tokens=8))
        with torch.no_grad():
            visuals = {k: pixels[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
            reference = ref.generate(input_ids=their_ids, attention_mask=torch.ones_like(their_ids), max_new_tokens=8,
                                     do_sample=False, **visuals)
        assert greedy == reference[0, their_ids.shape[1]:].tolist()


def video_frames(k: int):
    """k frames of a square moving across a photo, at the photo's odd size (each frame is squashed to one crop)."""
    frames = []
    for i in range(k):
        frame = photo(50, 40, seed=7).copy()
        frame.paste((255, 0, 0), (4 * i, 10, 4 * i + 8, 18))
        frames.append(frame)
    return frames


def test_video_logits_and_greedy_tokens(models):
    """An 8-frame video in OneVision: frames through tower and projector, 2x2 bilinear pooling after it (9 -> 5
    per side in the tiny model, as 27 -> 14 in the real one), one newline: 25 * 8 + 1 tokens. transformers' video
    processor needs torchvision, so the same PIL-processed frames go to both models; they equal what it does to
    each frame (SigLIP's squash to one crop)."""
    ref, _, ours = models("onevision_qwen2")
    frames = video_frames(8)
    video = process_video(frames, ours.cfg)
    assert video.pixels.shape == (8, 3, 27, 27) and video.num_tokens == 5 * 5 * 8 + 1 == video_tokens(8, ours.cfg)
    from transformers import SiglipImageProcessorPil  # what the OneVision video processor does to each frame

    siglip = SiglipImageProcessorPil(size={"height": 27, "width": 27}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert torch.equal(video.pixels, siglip(images=frames, return_tensors="pt")["pixel_values"])
    mine_ids, _ = prompt_ids("onevision_qwen2", [video.num_tokens])
    their_ids = torch.where(mine_ids == IMAGE_TOKEN, tc.VIDEO_TOKEN_ID["onevision_qwen2"], mine_ids)
    theirs = reference_logits(ref, "onevision_qwen2", their_ids, {"pixel_values_videos": video.pixels[None]})
    with torch.no_grad():
        mine = ours(mine_ids, [video])
    assert (mine - theirs).abs().max() <= TOL
    greedy = list(generate(ours, mine_ids[0].tolist(), [video], max_new_tokens=8))
    with torch.no_grad():
        reference = ref.generate(input_ids=their_ids, attention_mask=torch.ones_like(their_ids),
                                 pixel_values_videos=video.pixels[None], max_new_tokens=8, do_sample=False)
    assert greedy == reference[0, their_ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["next_llama", "onevision_qwen2"])
def test_greedy_tokens_match_over_12_steps(models, name):
    ref, processor, ours = models(name)
    image = photo(70, 30, seed=3)
    processed = [process_image(image, ours.cfg)]
    mine_ids, their_ids = prompt_ids(name, [processed[0].num_tokens])
    pixels = dict(processor(images=image, return_tensors="pt"))
    with torch.no_grad():
        out = ref.generate(input_ids=their_ids, attention_mask=torch.ones_like(their_ids), **pixels,
                           max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = out[0, their_ids.shape[1]:].tolist()
    mine = list(generate(ours, mine_ids[0].tolist(), processed, max_new_tokens=12))
    assert mine == theirs and len(mine) == 12


@pytest.mark.parametrize("name, template", [("llava15_llama", "vicuna_v1"), ("next_mistral", "mistral_instruct")])
def test_sentencepiece_prompt_end_to_end_equals_transformers(models, tiny, name, template):
    """A real prompt through a SentencePiece-style (Metaspace) tokenizer.json, as the llava-hf LLaVA-1.5 and 1.6
    Mistral repos ship: our ids (compat "transformers") equal the transformers processor's, and so do the logits
    and 8 greedy tokens. Two images, the second mid-text, so a word-start piece after an image would show."""
    from chat_template import load_tokenizer
    from data import render_prompt, tokenize

    ref, _, ours = models(name)
    images = [photo(45, 30, seed=1), photo(30, 70, seed=2)]
    prompt = render_prompt(template, [("user", "<image>\nWhat is this and<image>?")])
    inputs = dict(tc.load_full_processor(tiny(name))(images=images, text=prompt, return_tensors="pt"))
    processed = process_images(images, ours.cfg)
    mine = tokenize(load_tokenizer(tiny(name), name), prompt, [p.num_tokens for p in processed], "transformers")
    assert [tc.IMAGE_TOKEN_ID[name] if t == IMAGE_TOKEN else t for t in mine] == inputs["input_ids"][0].tolist()
    check_pixels(name, processed, inputs)
    with torch.no_grad():
        theirs = ref(**inputs).logits
        assert (ours(torch.tensor([mine]), processed) - theirs).abs().max() <= TOL
        reference = ref.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    assert list(generate(ours, mine, processed, max_new_tokens=8)) == reference[0, len(mine):].tolist()


@pytest.mark.parametrize("name", ["next_mistral", "next_qwen2"])
def test_kv_cache_equals_full_recompute(models, name):
    _, _, ours = models(name)
    image = photo(40, 60, seed=4)
    processed = [process_image(image, ours.cfg)]
    ids, _ = prompt_ids(name, [processed[0].num_tokens])
    continuation = [11, 12, 13, 14, 15, 16]
    full_ids = torch.cat([ids, torch.tensor([continuation])], dim=1)
    with torch.no_grad():
        full = ours(full_ids, processed)
        cache = KVCache(ours.cfg.text, 1, full_ids.shape[1], torch.float32, "cpu")
        stepwise = [ours(ids, processed, cache=cache)[0, -1]]
        for token in continuation:
            stepwise.append(ours(torch.tensor([[token]]), cache=cache)[0, -1])
    expected = full[0, ids.shape[1] - 1:]
    assert (torch.stack(stepwise) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name, shard_format, include_tower", [
    ("llava15_llama", "bin", False),  # LLaVA-1.5 originals: .bin shards without the CLIP tower
    ("next_mistral", "safetensors", True),
    ("next_qwen2", "safetensors", True),  # tied embeddings: no lm_head.weight
    ("onevision_qwen2", "safetensors", True),  # SigLIP: the tower repo has one layer more than LLaVA keeps
])
def test_original_layout_gives_the_same_logits(models, tmp_path, tiny, name, shard_format, include_tower):
    _, _, ours = models(name)
    folder = to_original_layout(tiny(name), tmp_path / "original", tower_dir=tmp_path / "tower",
                                   shard_format=shard_format, include_tower=include_tower)
    theirs_layout, _ = load_pretrained(str(folder), compat="transformers")
    assert theirs_layout.cfg == ours.cfg
    image = photo(130, 36, seed=5)
    processed = [process_image(image, ours.cfg)]
    ids, _ = prompt_ids(name, [processed[0].num_tokens])
    with torch.no_grad():
        assert torch.equal(theirs_layout(ids, processed), ours(ids, processed))


@pytest.mark.parametrize("values", [dict(pool_position="before"), dict(pool="average", pool_stride=3),
                                    dict(pool_images=True), dict(max_grid=2, token_threshold=100)])
def test_knobs_splice_the_counted_tokens_and_survive_a_checkpoint(tiny, tmp_path, values):
    """Each knob changes what reaches the decoder (the logits move), the model splices exactly the count the
    counter reserved (it raises otherwise), and a saved checkpoint loads with the same knobs and logits."""
    import dataclasses

    from export import save_pretrained

    model, _ = load_pretrained(str(tiny("onevision_qwen2")))
    image, video = photo(130, 36, seed=4), video_frames(3)
    ids = lambda processed: prompt_ids("onevision_qwen2", [p.num_tokens for p in processed])[0]  # noqa: E731
    with torch.no_grad():
        before = [process_image(image, model.cfg), process_video(video, model.cfg)]
        released = model(ids(before), before)
        model.cfg.higher_anyres = dataclasses.replace(model.cfg.higher_anyres, **values)
        processed = [process_image(image, model.cfg), process_video(video, model.cfg)]
        tuned = model(ids(processed), processed)
    assert released.shape != tuned.shape or (released - tuned).abs().max() > 1e-3
    save_pretrained(model, tmp_path)
    again, _ = load_pretrained(str(tmp_path))
    assert again.cfg.higher_anyres == model.cfg.higher_anyres
    with torch.no_grad():
        assert torch.equal(again(ids(processed), processed), tuned)


@pytest.mark.parametrize("frozen", [False, True])
def test_checkpointed_tower_gives_the_same_gradients(tiny, frozen):
    """--gradient-checkpointing recomputes each vision block in backward while the tower trains (stage 1.5): every
    gradient equals the stored-activations run's (fp32, <= 1e-6); a frozen tower is not checkpointed at all."""
    import torch.utils.checkpoint as ckpt

    model, _ = load_pretrained(str(tiny("next_llama")))
    model.train().requires_grad_(True)
    model.vision_tower.requires_grad_(not frozen)
    assert next(model.parameters()).dtype == torch.float32
    image = process_image(photo(130, 36, seed=3), model.cfg)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * image.num_tokens + [7, 9, 11]])
    calls, real = [], ckpt.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return real(fn, *args, **kwargs)

    grads = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        model.vision_tower.gradient_checkpointing = on
        torch.utils.checkpoint.checkpoint = counting
        try:
            model(ids, [image]).float().logsumexp(-1).sum().backward()
        finally:
            torch.utils.checkpoint.checkpoint = real
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == ([] if frozen else ["VisionBlock"] * model.cfg.vision.num_layers)
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("vision_tower.layers.") for n in grads[0]) != frozen
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-6, name
