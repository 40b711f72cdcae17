"""Top-k / temperature sampling on every fused backend (cpu, triton, cuda): support, distribution, seeds.

Shapes and statistics: tests/parity.py.  The shared layer above the kernels
(gptfast/ops/sampling.py: the scalar/per-row convention, "no top-k", fakes) is also run
against a recording stand-in of the kernel schema, so it is checked on any machine.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import subprocess

import pytest
import torch

import parity
from gptfast import ops
from gptfast.ops import sampling
from parity import backend_cases, backend_devices, needs_cpu_backend, needs_cuda, needs_interpreter

OP = "sample_next_token"
REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the one argument convention

_REF = "gptfast_sampling_reference"
_ref_lib = torch.library.Library(_REF, "DEF")
_ref_lib.define("sample_next_token(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
                "int top_k_value, Generator? generator) -> Tensor")
_calls: list = []


def _recording_sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator):
    _calls.append((temperature, temperature_value, top_k, top_k_value, generator))
    return torch.argmax(logits, dim=1, keepdim=True)


_ref_lib.impl("sample_next_token", _recording_sample_next_token, "CPU")
sampling.register(_REF)


def test_wiring_maps_scalars_and_per_row_tensors_to_the_kernel():
    logits = torch.randn(3, 10)
    temps, ks = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1, 4, 10])
    gen = torch.Generator().manual_seed(1234)
    _calls.clear()
    out = sampling.fused_sample_next_token(_REF, logits, temperature=0.7, top_k=None)
    assert out.shape == (3, 1) and out.dtype == torch.int64
    sampling.fused_sample_next_token(_REF, logits, temperature=temps, top_k=5, generator=gen)
    sampling.fused_sample_next_token(_REF, logits, temperature=0.0, top_k=ks)
    (t0, tv0, k0, kv0, g0), (t1, tv1, k1, kv1, g1), (t2, tv2, k2, kv2, _) = _calls
    assert t0 is None and tv0 == 0.7 and k0 is None and kv0 == 10 and g0 is None  # no top_k: keep all V
    assert torch.equal(t1, temps) and k1 is None and kv1 == 5 and g1.initial_seed() == 1234
    assert t2 is None and tv2 == 0.0 and torch.equal(k2, ks)


def test_wiring_opcheck():
    logits = torch.randn(3, 11)
    op = getattr(torch.ops, _REF).sample_next_token
    torch.library.opcheck(op, (logits, None, 0.0, None, 11, None))
    torch.library.opcheck(op, (logits, torch.ones(3), 0.0, torch.tensor([1, 2, 3]), 11, None))


# --------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("top_k", [None, 1, 5, 25])
def test_greedy_is_argmax(backend, device, dtype, top_k):
    g = torch.Generator().manual_seed(4)
    for shape in ((8, 1000), (3, 50257), (1, 50257)):  # one row: a one-row tile, as B=64 V=50257 gets on a GPU
        logits = (torch.randn(*shape, generator=g) * 3).to(device=device, dtype=dtype)
        parity.check_sampling_greedy(backend, logits, top_k=top_k)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device, dtype=dtype)
    parity.check_sampling_greedy(backend, ties)  # first index on ties, like torch.argmax


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 5, 50257])
def test_cuda_greedy_with_all_tied_rows_and_full_top_k(dtype, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, vocab, generator=g) * 3).to(dtype).cuda()
    logits[0, :] = 1.0  # all tied: the first index
    parity.check_sampling_greedy("cuda", logits)
    parity.check_sampling_greedy("cuda", logits, top_k=1)
    parity.check_sampling_greedy("cuda", logits, top_k=vocab)


@pytest.mark.parametrize("backend,device,dtype", backend_cases(OP))
@pytest.mark.parametrize("vocab,top_k,temperature", [(50, 7, 0.8), (50, 50, 1.5), (30, 2, 0.8), (400, 300, 0.8),
                                                     (60, 60, 1.3)])
def test_distribution(backend, device, dtype, vocab, top_k, temperature):
    """Small k, large k (the CPU's nth_element path), and k = vocab (no filter)."""
    parity.check_sampling_distribution(backend, vocab=vocab, top_k=top_k, temperature=temperature, device=device,
                                       dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab,top_k,temperature", [(300, 1, 1.0), (5000, 20, 0.6)])
def test_cuda_distribution_wide(dtype, vocab, top_k, temperature):
    parity.check_sampling_distribution("cuda", vocab=vocab, top_k=top_k, temperature=temperature, device="cuda",
                                       dtype=dtype)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_distribution_without_top_k(backend, device):
    g = torch.Generator().manual_seed(13)
    row = torch.randn(20, generator=g)
    draws = 8000
    logits = row.expand(draws, 20).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(14)
    tokens = ops.sample_next_token(logits, temperature=0.5, generator=gen, backend=backend).squeeze(1).cpu()
    counts = torch.bincount(tokens, minlength=20).double()
    expected = torch.softmax(row.double() / 0.5, -1) * draws
    seen = expected > 0.5
    chi2 = float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())
    assert chi2 < 3 * int(seen.sum()) + 30, chi2  # far above the 99.99% quantile for <= 19 dof


@pytest.mark.parametrize("backend,device", backend_devices())
def test_reproducible_and_seeded(backend, device):
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(15)).to(device)
    parity.check_sampling_reproducible(backend, logits, device=device)
    parity.check_sampling_reproducible(backend, logits, top_k=None, temperature=0.7, device=device)
    # No generator: torch's default generator on the device, so torch.manual_seed reproduces the draw.
    torch.manual_seed(3)
    a = ops.sample_next_token(logits, temperature=1.0, top_k=25, backend=backend)
    b = ops.sample_next_token(logits, temperature=1.0, top_k=25, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(a, ops.sample_next_token(logits, temperature=1.0, top_k=25, backend=backend))
    assert not torch.equal(a, b), "the default generator must advance"


@pytest.mark.parametrize("backend,device", [c for c in backend_devices() if c.values[0] != "cuda"])
def test_greedy_leaves_the_generator_untouched(backend, device):
    logits = torch.randn(4, 100, device=device)
    gen = torch.Generator(device=device).manual_seed(5)
    state = gen.get_state()
    ops.sample_next_token(logits, temperature=0.0, top_k=10, generator=gen, backend=backend)
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_top_1_is_argmax_at_any_temperature(backend, device):
    logits = torch.randn(300, 64, device=device)
    gen = torch.Generator(device=device).manual_seed(2)
    tokens = ops.sample_next_token(logits, temperature=5.0, top_k=1, generator=gen, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_single_row_large_vocab_stays_in_top_k(backend, device):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, 50257, generator=g) * 3).to(device)
    allowed = parity.top_k_support(logits.cpu(), 50)[0]
    for seed in range(4):
        gen = torch.Generator(device=device).manual_seed(seed)
        token = ops.sample_next_token(logits, temperature=1.0, top_k=50, generator=gen, backend=backend)
        assert allowed[token.item()]


@pytest.mark.parametrize("backend,device", backend_devices())
def test_ties_at_the_kth_value_are_kept(backend, device):
    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0, -2.0, 4.0 - 1e-3])
    logits = row.expand(3000, -1).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = ops.sample_next_token(logits, temperature=50.0, top_k=2, generator=gen, backend=backend).cpu()
    assert set(tokens.flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("backend,device", backend_devices())
def test_support_is_exactly_top_k_with_many_ties(backend, device):
    """Coarsely rounded logits tie everywhere; the kept set must still be exactly {x >= k-th largest}."""
    g = torch.Generator().manual_seed(8)
    rows = [(torch.randn(60, generator=g) * 2).round() / 2 for _ in range(2)]
    rows.append(torch.full((60,), -1.5))  # all equal
    rows.append(torch.linspace(-1e-30, 1e-30, 60))  # tiny values around +-0
    for top_k in (1, 5, 40):
        for row in rows:
            logits = row.expand(800, -1).contiguous().to(device)
            gen = torch.Generator(device=device).manual_seed(top_k)
            tokens = ops.sample_next_token(logits, temperature=1e4, top_k=top_k, generator=gen, backend=backend)
            support = parity.top_k_support(row[None], top_k)[0].nonzero().flatten().tolist()
            assert sorted(set(tokens.flatten().tolist())) == support, f"top_k={top_k} row={row.tolist()}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_support_at_gpt2_vocab_with_ties(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 50257, generator=g) * 2).to(dtype)
    logits[:, 100:110] = logits.float().max() + 1  # ten tied maxima
    logits = logits.cuda()
    for top_k in (1, 10, 11, 50, 1000):
        tokens = ops.sample_next_token(logits, temperature=1.0, top_k=top_k, backend="cuda")
        assert parity.top_k_support(logits, top_k).gather(1, tokens).all(), f"token outside the top-{top_k} set"
    tokens = ops.sample_next_token(logits, temperature=1.0, top_k=10, backend="cuda")
    assert ((tokens >= 100) & (tokens < 110)).all()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_per_row_arguments(backend, device):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 300, generator=g) * 2).to(device)

    def draw(temperature, top_k):
        gen = torch.Generator(device=device).manual_seed(9)
        return ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen, backend=backend)

    # Uniform per-row tensors draw exactly what the scalar arguments draw under one seed.
    scalar = draw(0.9, 20)
    tensors = draw(torch.full((64,), 0.9, device=device), torch.full((64,), 20, device=device, dtype=torch.long))
    assert torch.equal(scalar, tensors)
    # Mixed rows: temperature 0 rows are greedy, the others stay inside their own top-k.
    temperature = torch.tensor([0.0, 1.0] * 32, device=device)
    top_k = torch.arange(1, 65, device=device)
    tokens = draw(temperature, top_k).squeeze(1).cpu()
    cpu_logits = logits.cpu()
    assert torch.equal(tokens[0::2], cpu_logits[0::2].argmax(-1))
    for row in range(1, 64, 2):
        kth = torch.topk(cpu_logits[row], row + 1).values[-1]
        assert cpu_logits[row, tokens[row]] >= kth


@pytest.mark.parametrize("backend,device", backend_devices())
def test_per_row_top_1_and_full_top_k(backend, device):
    g = torch.Generator().manual_seed(17)
    logits = (torch.randn(4, 100, generator=g) * 2).repeat_interleave(500, 0).to(device)
    temperature = torch.tensor([0.0, 1.0, 0.7, 2.0]).repeat_interleave(500).to(device)
    top_k = torch.tensor([5, 1, 3, 100]).repeat_interleave(500).to(device)
    gen = torch.Generator(device=device).manual_seed(18)
    tokens = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen,
                                   backend=backend).squeeze(1).cpu()
    logits = logits.cpu()
    argmax = logits.argmax(-1)
    assert torch.equal(tokens[:500], argmax[:500]), "temperature 0 rows are greedy"
    assert torch.equal(tokens[500:1000], argmax[500:1000]), "top_k 1 rows are greedy"
    allowed = logits[1000:1500] >= torch.topk(logits[1000:1500], 3).values[:, -1:]
    assert allowed.gather(1, tokens[1000:1500, None]).all(), "per-row top_k respected"
    assert len(set(tokens[1500:].tolist())) > 20, "top_k = vocab with T=2 spreads widely"


@pytest.mark.parametrize("backend,device", backend_devices())
def test_never_draws_masked_tokens_and_full_top_k_is_no_top_k(backend, device):
    logits = torch.randn(200, 40, device=device)
    logits[:, ::2] = float("-inf")
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = ops.sample_next_token(logits, temperature=2.0, generator=gen, backend=backend)
    assert (tokens % 2 == 1).all()

    def draw(top_k):
        gen = torch.Generator(device=device).manual_seed(3)
        return ops.sample_next_token(logits, temperature=1.0, top_k=top_k, generator=gen, backend=backend)

    assert torch.equal(draw(40), draw(None))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("vocab", [100, 128], ids=lambda v: f"V{v}")
def test_top_k_is_exact_when_logits_span_many_powers_of_two(backend, device, vocab):
    """The k-th largest value is found exactly even when each bisection step in value space would move past
    only one value (-1, -2, -4, ...): at a huge temperature every kept token is about equally likely, so a
    second kept token would show up."""
    row = -(2.0 ** torch.arange(vocab, dtype=torch.float64)).float()
    assert row.isfinite().all()
    logits = row.expand(300, vocab).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(4)
    for top_k in (1, 3):
        tokens = ops.sample_next_token(logits, temperature=1e30, top_k=top_k, generator=gen, backend=backend)
        counts = torch.bincount(tokens.squeeze(1).cpu(), minlength=vocab)
        assert counts[top_k:].sum() == 0 and (counts[:top_k] > 0).all(), counts[:8]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("vocab", [4, 40], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("top_k", [None, 3], ids=lambda k: f"top{k}")
def test_infinite_temperature_is_uniform_over_finite_logits(backend, device, vocab, top_k):
    """softmax(x / T) tends to uniform over the finite logits as T grows: a -inf logit is never drawn (its
    (-inf) * (1 / T) = (-inf) * 0 must not become a NaN weight), the finite ones (top-k kept) equally often."""
    g = torch.Generator().manual_seed(21)
    row = torch.randn(vocab, generator=g)
    row[1::2] = float("-inf")  # V4: tokens 0 and 2 finite; V40: the 20 even tokens
    support = row.isfinite()
    if top_k is not None:
        support &= row >= row.topk(top_k).values[-1]
    draws = 4000
    logits = row.expand(draws, vocab).contiguous().to(device)
    gen = torch.Generator(device=device).manual_seed(22)
    tokens = ops.sample_next_token(logits, temperature=math.inf, top_k=top_k, generator=gen,
                                   backend=backend).squeeze(1).cpu()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~support].sum() == 0, counts
    expected = draws / int(support.sum())
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 3 * int(support.sum()) + 30, chi2


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck(backend, device):
    # Greedy keeps the output deterministic, which opcheck's comparisons need.
    kwargs = parity.opcheck_kwargs(backend, device)
    op = parity.kernel_namespace(backend).sample_next_token.default
    logits = torch.randn(3, 300, device=device)
    torch.library.opcheck(op, (logits, None, 0.0, None, 300, None), **kwargs)
    torch.library.opcheck(op, (logits, torch.zeros(3, device=device), 1.0,
                               torch.tensor([1, 2, 3], device=device), 300, None), **kwargs)
    if backend == "cuda":
        torch.library.opcheck(op, (logits.half(), None, 0.0, None, 17, None))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_bad_input(backend, device):
    logits = torch.randn(2, 10, device=device)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=0, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, temperature=1.0, top_k=11, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_next_token(logits, temperature=-0.5, backend=backend)
    with pytest.raises(ValueError, match="batch, vocab"):
        ops.sample_next_token(logits[0], backend=backend)
    with pytest.raises(TypeError, match="floating"):
        ops.sample_next_token(logits.long(), backend=backend)
    if device == "cpu":  # per-row values are checked in Python only for CPU tensors (no host sync on a GPU)
        with pytest.raises(ValueError, match="temperature"):
            ops.sample_next_token(logits, temperature=torch.tensor([1.0, -1.0]), backend=backend)
        with pytest.raises(ValueError, match="top_k"):
            ops.sample_next_token(logits, temperature=1.0, top_k=torch.tensor([3, 0]), backend=backend)
    if backend != "cpu":
        with pytest.raises(RuntimeError, match="float64"):
            ops.sample_next_token(logits.double(), temperature=1.0, backend=backend)


@needs_cpu_backend
def test_cpu_kernel_bounds_checks_top_k_itself():
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.gptfast_cpu.sample_next_token(torch.randn(2, 5), None, 1.0, None, 6, None)


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_draws_do_not_depend_on_the_thread_count(dtype):
    """Under one generator seed the tokens are the same with 1, 2 and 3 threads (96 rows of 32768: several
    parallel tasks), with and without top-k and with per-row arguments."""
    g = torch.Generator().manual_seed(23)
    logits = (torch.randn(96, 32768, generator=g) * 2).to(dtype)
    per_row = (torch.rand(96, generator=g) * 1.5, torch.randint(1, 200, (96,), generator=g))
    settings = [(1.0, None), (0.8, 40), per_row]
    before = torch.get_num_threads()
    draws = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for temperature, top_k in settings:
                gen = torch.Generator().manual_seed(24)
                draws.append(ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen,
                                                   backend="cpu"))
    finally:
        torch.set_num_threads(before)
    n = len(settings)
    assert all(len(set(d.flatten().tolist())) > 10 for d in draws[:n])  # the rows draw different tokens
    for i in range(n, len(draws)):
        assert torch.equal(draws[i % n], draws[i]), f"setting {i % n}, {1 + i // n} threads"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_interpreter_refuses_16_bit_instead_of_returning_garbage(dtype):
    with pytest.raises(RuntimeError, match="interpreter.*wrongly"):
        ops.sample_next_token(torch.randn(2, 50, dtype=dtype), temperature=1.0, backend="triton")


@needs_interpreter
def test_triton_gpu_tile_sizes_in_the_interpreter(monkeypatch):
    from gptfast.triton_kernels import sampling as kernels
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    logits = torch.randn(2, 50257)
    parity.check_sampling_greedy("triton", logits, top_k=50)
    gen = torch.Generator().manual_seed(0)
    tokens = ops.sample_next_token(logits, temperature=1.0, top_k=50, generator=gen, backend="triton")
    assert parity.top_k_support(logits, 50).gather(1, tokens).all()


def _triton_exponential(word0: torch.Tensor, word1: torch.Tensor) -> torch.Tensor:
    """The Triton sampler's Exp(1) draw for given pairs of 32-bit words (int64 holders of uint32 values)."""
    import triton

    device = "cpu" if parity.INTERPRETER else "cuda"
    out = torch.empty(word0.numel(), dtype=torch.float32, device=device)
    _exponential_kernel()[(1,)](word0.to(device), word1.to(device), out, word0.numel(),
                                BLOCK=triton.next_power_of_2(word0.numel()))
    return out.cpu()


def _exponential_kernel():
    """A one-program kernel applying the sampler's ``_exponential`` (its globals must be module-level names)."""
    global _EXPONENTIAL_KERNEL, _triton_sampling, tl
    if _EXPONENTIAL_KERNEL is None:
        import triton
        import triton.language as tl
        from gptfast.triton_kernels import sampling as _triton_sampling

        @triton.jit
        def apply(w0_ptr, w1_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            ok = offs < n
            w0 = tl.load(w0_ptr + offs, mask=ok, other=0).to(tl.uint32)
            w1 = tl.load(w1_ptr + offs, mask=ok, other=0).to(tl.uint32)
            tl.store(out_ptr + offs, _triton_sampling._exponential(w0, w1), mask=ok)

        _EXPONENTIAL_KERNEL = apply
    return _EXPONENTIAL_KERNEL


_EXPONENTIAL_KERNEL = _triton_sampling = tl = None


def _exponential_oracle(word0: torch.Tensor, word1: torch.Tensor) -> torch.Tensor:
    """-log1p(-v) in float64 for the point v the two words pick (23 bits each; bucket midpoints from 1/2 up)."""
    high = (word0 >> 9).double() * 2.0**-23
    v = torch.where(high < 0.5, high + ((word1 >> 9).double() + 0.5) * 2.0**-46, high + 2.0**-24)
    return -torch.log1p(-v), v


def _exponential_words() -> tuple[torch.Tensor, torch.Tensor]:
    """Word pairs for the exponential draws: every pair of edge words, random ones, and the switch points."""
    edges = [0, 1, 511, 512, 1023, 2**16, 2**31 - 1, 2**31, 2**32 - 512, 2**32 - 1]
    gen = torch.Generator().manual_seed(0)
    random_words = [torch.randint(0, 2**32, (4000,), generator=gen) for _ in range(2)]
    word0 = torch.cat([torch.tensor([e for e in edges for _ in edges]), random_words[0]])
    word1 = torch.cat([torch.tensor(edges * len(edges)), random_words[1]])
    # Around the series/log switch at 1/16 and the sum/midpoint switch at 1/2, with the lowest and highest word1.
    around = [(2**19 - 1) << 9, 2**19 << 9, (2**19 + 1) << 9, (2**22 - 1) << 9, 2**22 << 9, (2**22 + 1) << 9]
    word0 = torch.cat([word0, torch.tensor(around * 2)])
    word1 = torch.cat([word1, torch.tensor([0] * len(around) + [2**32 - 1] * len(around))])
    return word0, word1


def _check_exponential_draws(draws: torch.Tensor, word0: torch.Tensor, word1: torch.Tensor, rtol_above: float):
    """Draws equal -log1p(-v) of the words' point v, are finite and > 0, and reach far into the tail."""
    oracle, v = _exponential_oracle(word0, word1)
    assert torch.isfinite(draws).all() and (draws > 0).all()
    # Below 1/16 (Triton's series): a few fp32 roundings.  Above, v itself is rounded to fp32.
    small = v < 1 / 16
    torch.testing.assert_close(draws[small], oracle[small], rtol=4e-7, atol=0)
    torch.testing.assert_close(draws[~small], oracle[~small], rtol=rtol_above, atol=0)
    assert draws.min() < 2.0**-46  # -log(E) > 31.9: tokens 30 (x - max) / T below the top are still drawn
    assert draws.max() > 16.0  # and the top token's Gumbel noise reaches down to -2.8


@pytest.mark.skipif(not (parity.INTERPRETER or parity.HAS_CUDA) or "triton" not in ops.available_backends(),
                    reason="needs the Triton interpreter or a GPU")
def test_triton_exponential_draws_are_exact_and_reach_far_into_the_tail():
    """Small draws decide how unlikely a token can be and still be sampled: they must reach ~2**-47."""
    word0, word1 = _exponential_words()
    # Above 1/16 the GPU's fp32 log is good to ~1e-7 absolute, so E (> 0.064) to ~2e-6 relative.
    _check_exponential_draws(_triton_exponential(word0, word1).double(), word0, word1,
                             rtol_above=2e-6 if parity.INTERPRETER else 4e-6)


# --------------------------------------------------------------------------- GPU only


@needs_cuda
def test_cuda_per_row_parameters_are_clamped_by_the_kernel():
    from gptfast.ops import cuda_ops
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 1000, generator=g).cuda()
    temps = torch.tensor([0.0, 1.0, 1.0, 2.0, -1.0, math.nan], device="cuda")  # <= 0 / NaN: greedy
    ks = torch.tensor([5, 1, 0, 3000, 7, 7], device="cuda")  # 0 -> 1, 3000 -> vocab (kernel clamps)
    argmax = logits.argmax(1)
    for _ in range(20):
        # the tensors bypass Python's value checks on purpose: the kernel must clamp
        tokens = cuda_ops.sample_next_token(logits, temperature=temps, top_k=ks).squeeze(1)
        assert tokens[0] == argmax[0] and tokens[1] == argmax[1] and tokens[2] == argmax[2]
        assert tokens[4] == argmax[4] and tokens[5] == argmax[5]
        assert 0 <= int(tokens[3]) < 1000


@needs_cuda
def test_cuda_strided_rows_match_contiguous():
    logits = torch.randn(4, 7, 501, device="cuda", dtype=torch.bfloat16)
    last = logits[:, -1, :]  # rows 7 * 501 elements apart
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    a = ops.sample_next_token(last, temperature=0.9, top_k=40, generator=gen, backend="cuda")
    gen.manual_seed(3)
    b = ops.sample_next_token(last.contiguous(), temperature=0.9, top_k=40, generator=gen, backend="cuda")
    assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_cuda_graph_capture(backend):
    logits = torch.randn(64, 50257, device="cuda", dtype=torch.bfloat16)
    temperature = torch.full((64,), 0.8, device="cuda")
    ops.sample_next_token(logits, temperature=temperature, top_k=50, backend=backend)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.sample_next_token(logits, temperature=0.8, top_k=50, backend=backend)
        ops.sample_next_token(logits, temperature=temperature, top_k=torch.full((64,), 50, device="cuda"),
                              backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        ops.sample_next_token(logits, temperature=0.8, top_k=50, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = ops.sample_next_token(logits, temperature=0.8, top_k=50, backend=backend)
    allowed = parity.top_k_support(logits, 50)
    torch.manual_seed(21)
    graph.replay()
    first = tokens.clone()
    replays = [first]
    for _ in range(5):
        graph.replay()
        replays.append(tokens.clone())
    assert all(allowed.gather(1, t).all() for t in replays)
    assert any(not torch.equal(first, t) for t in replays[1:]), "replays must draw fresh numbers"
    torch.manual_seed(21)
    graph.replay()
    assert torch.equal(tokens, first), "graph replays must follow torch.manual_seed"


@needs_cuda
def test_cuda_binding_rejects_bad_per_row_tensors():
    logits = torch.randn(3, 10, device="cuda")
    with pytest.raises(ValueError, match="temperature must have shape"):
        torch.ops.gptfast_cuda.sample_next_token(logits, torch.ones(2, device="cuda"), 0.0, None, 10, None)
    with pytest.raises(TypeError, match="top_k must be"):
        torch.ops.gptfast_cuda.sample_next_token(logits, None, 1.0, torch.ones(3, device="cuda"), 10, None)
    with pytest.raises(ValueError, match="top_k_value"):
        torch.ops.gptfast_cuda.sample_next_token(logits, None, 1.0, None, 0, None)


@pytest.mark.skipif(shutil.which("nvcc") is None and not pathlib.Path("/usr/local/bin/nvcc").exists(),
                    reason="needs nvcc")
def test_philox_header_matches_random123_known_answers_and_its_exponential_draws(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    src = tmp_path / "kat.cu"
    src.write_text(r"""
#include "philox.cuh"
#include <cstdio>
int main() {
  const uint2 keys[3] = {{0u, 0u}, {0xffffffffu, 0xffffffffu}, {0xa4093822u, 0x299f31d0u}};
  const uint4 ctrs[3] = {{0u, 0u, 0u, 0u}, {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                         {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
  for (int i = 0; i < 3; ++i) {
    const uint4 r = gptfast::philox4x32_10(keys[i], ctrs[i]);
    std::printf("%08x %08x %08x %08x\n", r.x, r.y, r.z, r.w);
  }
  unsigned int w0, w1;
  while (std::scanf("%u %u", &w0, &w1) == 2) std::printf("%.9e\n", gptfast::philox_exponential(w0, w1));
}
""")
    exe = tmp_path / "kat"
    subprocess.run([nvcc, "-std=c++17", "-I", str(REPO / "csrc" / "cuda"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    word0, word1 = _exponential_words()
    pairs = "".join(f"{a} {b}\n" for a, b in zip(word0.tolist(), word1.tolist()))
    lines = subprocess.run([str(exe)], input=pairs, check=True, capture_output=True, text=True).stdout.splitlines()
    # Random123's kat_vectors for philox4x32_10.
    assert lines[:3] == ["6627e8d5 e169c58d bc57ac4c 9b00dbd8",
                         "408f276d 41c83b0e a20bc7c6 6d5451fd",
                         "d16cfe09 94fdcceb 5001e420 24126ea1"]
    # The exponential draws of the CUDA sampler: the same construction as the Triton one's, checked the same way.
    _check_exponential_draws(torch.tensor([float(v) for v in lines[3:]], dtype=torch.float64), word0, word1,
                             rtol_above=4e-7)
