"""Backend "cuda" (csrc/cuda): cross-entropy and sampling.

Three groups:

* availability and errors, on any machine;
* this backend's Python wiring (reductions, autograd, fake impls, argument mapping),
  run on the CPU against ops that emulate the kernels' documented contract;
* the kernels themselves against the torch oracle, on a CUDA device (skipped only
  where no CUDA device exists: with one, a missing build fails these tests).

The Philox header is checked against the Random123 known-answer vectors by compiling a
host program with nvcc (skipped where nvcc is absent).  The nvcc/g++ compile check of
every csrc/cuda file is .ci/check_cuda_compile.sh, run by CI.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import parity
from gptfast import ops
from gptfast.ops import cuda_ops, torch_ops

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- availability


def test_unavailable_reason_names_the_cause():
    reason = cuda_ops.unavailable_reason()
    if cuda_ops._C_cuda is None:
        assert "built without CUDA" in reason and "nvcc" in reason
    elif not HAS_CUDA:
        assert reason == "no CUDA device is available (torch.cuda.is_available() is False)"
    else:
        assert reason is None
    assert ops.backend_status()["cuda"] == (reason or "available")
    assert ("cuda" in ops.available_backends()) == (reason is None)


@pytest.mark.skipif(HAS_CUDA and cuda_ops._C_cuda is not None, reason="the backend is available here")
def test_use_backend_cuda_raises_with_the_reason():
    reason = cuda_ops.unavailable_reason()
    with pytest.raises(RuntimeError, match="gptfast backend 'cuda' is not available: ") as info:
        ops.use_backend("cuda")
    assert reason in str(info.value)
    with pytest.raises(RuntimeError, match="cannot run sample_next_token"):
        ops.sample_next_token(torch.randn(2, 5), backend="cuda")


def test_auto_never_picks_cuda_for_cpu_tensors():
    x = torch.randn(3, 7)
    assert ops.selected_backend("cross_entropy", x, torch.tensor([0, 1, 2])) != "cuda"
    assert ops.selected_backend("sample_next_token", x) != "cuda"


def test_supports_refuses_float64_and_unknown_ops_with_a_reason():
    x = torch.randn(2, 5, dtype=torch.float64)
    assert "float64" in cuda_ops.supports("cross_entropy", x, torch.tensor([0, 1]))
    assert "float64" in cuda_ops.supports("sample_next_token", x)
    assert cuda_ops.supports("cross_entropy", x.float(), torch.tensor([0, 1])) is None
    assert cuda_ops.supports("sample_next_token", x.half()) is None
    assert "does not implement" in cuda_ops.supports("linear_cross_entropy", x, x, torch.tensor([0, 1]))


def test_auto_picks_no_cuda_kernel_before_it_is_measured_on_a_gpu():
    # AUTO_OPS holds only ops measured faster than torch; no GPU has measured these yet.
    assert cuda_ops.AUTO_OPS == frozenset()


def test_attention_plugs_in_when_its_module_imports():
    try:
        from gptfast.ops import cuda_attention
    except ImportError:
        q = torch.randn(1, 1, 2, 64, dtype=torch.float16)
        assert "not part of this build" in cuda_ops.supports("causal_attention", q, q, q)
        return
    assert cuda_ops.causal_attention is cuda_attention.causal_attention
    q = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    expected = cuda_attention.attention_unsupported_reason(q, q, q, dropout_p=0.0, training=False, scale=None)
    assert cuda_ops.supports("causal_attention", q, q, q, dropout_p=0.0, training=False, scale=None) == expected


def test_bad_input_is_refused_before_any_backend_runs():
    with pytest.raises(ValueError, match="targets contains 9"):
        ops.cross_entropy(torch.randn(2, 5), torch.tensor([0, 9]), backend="torch")
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(torch.randn(2, 5), top_k=6, temperature=1.0)
    with pytest.raises(TypeError, match="logits"):
        ops.sample_next_token(torch.arange(5).view(1, 5))


# --------------------------------------------------------------------------- Philox header


@pytest.mark.skipif(shutil.which("nvcc") is None and not pathlib.Path("/usr/local/bin/nvcc").exists(),
                    reason="needs nvcc")
def test_philox_header_matches_random123_known_answers(tmp_path):
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
  std::printf("%.9g %.9g\n", gptfast::philox_uint_to_uniform(0u), gptfast::philox_uint_to_uniform(0xffffffffu));
}
""")
    exe = tmp_path / "kat"
    subprocess.run([nvcc, "-std=c++17", "-I", str(REPO / "csrc" / "cuda"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    # Random123's kat_vectors for philox4x32_10.
    assert lines[:3] == ["6627e8d5 e169c58d bc57ac4c 9b00dbd8",
                         "408f276d 41c83b0e a20bc7c6 6d5451fd",
                         "d16cfe09 94fdcceb 5001e420 24126ea1"]
    low, high = (float(v) for v in lines[3].split())
    assert 0.0 < low < 1e-9 and high == 1.0


@pytest.mark.skipif(shutil.which("g++") is None or not pathlib.Path("/usr/local/cuda/include/cuda_fp16.h").exists(),
                    reason="needs g++ and the CUDA headers")
def test_kernels_on_the_cpu_emulator():
    """cross_entropy.cu and sampling.cu run on tests/cuda_emulation (one fiber per CUDA thread)
    and checked against double-precision references: every dtype, alignment, block size,
    ignore/bad targets, in-place gradient, greedy, top-k ties, distribution, Philox plumbing.
    (The full set with ASan/UBSan: python tests/cuda_emulation/run_emulation.py.)"""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "cuda_emulation" / "run_emulation.py"),
                             "--quick", "--no-sanitize"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OK: 0 failures" in result.stdout


# --------------------------------------------------------------------------- Python wiring on the CPU

# CPU ops with the kernels' contract (see csrc/cuda/loss_sampling_launch.h), registered
# under another namespace so that cuda_ops' fake impls, autograd and reductions can be
# exercised here.
_EMUL = "gptfast_cuda_emul"
_emul_lib = torch.library.Library(_EMUL, "DEF")
_emul_lib.define("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, bool want_grad) -> (Tensor, Tensor)")
_emul_lib.define("sample_next_token(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
                 "int top_k_value, Generator? generator) -> Tensor")
_sampling_calls: list = []


def _emulated_cross_entropy_fwd(logits, targets, ignore_index, want_grad):
    x = logits.float()
    t = targets.long()
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= x.shape[1]))
    safe = torch.where(ignored | bad, torch.zeros_like(t), t)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss).masked_fill(bad, math.nan)
    if not want_grad:
        return loss, logits.new_empty((0,))
    grad = torch.softmax(x, dim=1) - torch.nn.functional.one_hot(safe, x.shape[1]).float()
    grad = grad.masked_fill(ignored[:, None], 0.0).masked_fill(bad[:, None], math.nan)
    return loss, grad.to(logits.dtype)


def _emulated_sample_next_token(logits, temperature, temperature_value, top_k, top_k_value, generator):
    _sampling_calls.append((temperature, temperature_value, top_k, top_k_value, generator))
    return torch.argmax(logits, dim=1, keepdim=True)


_emul_lib.impl("cross_entropy_fwd", _emulated_cross_entropy_fwd, "CPU")
_emul_lib.impl("sample_next_token", _emulated_sample_next_token, "CPU")
cuda_ops.register_python_parts(_EMUL)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_ops", lambda: getattr(torch.ops, _EMUL))
    _sampling_calls.clear()
    return getattr(torch.ops, _EMUL)


def _ce_case(shape, dtype, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 3
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    targets[torch.rand(shape[:-1], generator=g) < 0.25] = ignore_index
    return logits.to(dtype), targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3), (7, 100), (2, 5, 33)])
def test_wiring_cross_entropy_matches_the_oracle_forward_and_grad(emulated, shape, dtype, reduction):
    logits, targets = _ce_case(shape, dtype)
    x1 = logits.clone().requires_grad_(True)
    loss = cuda_ops.cross_entropy(x1, targets, ignore_index=-100, reduction=reduction)
    x2 = logits.double().requires_grad_(True)
    ref = torch_ops.cross_entropy(x2, targets, ignore_index=-100, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    parity.assert_close(loss.detach(), ref.detach(), dtype, f"loss {reduction}")
    upstream = torch.randn(ref.shape) if reduction == "none" else torch.tensor(1.7)
    loss.backward(upstream.to(dtype))
    ref.backward(upstream.double())
    parity.assert_close(x1.grad, x2.grad, dtype, f"grad {reduction}")


def test_wiring_cross_entropy_all_ignored_mean_is_nan_like_pytorch(emulated):
    logits = torch.randn(3, 4, requires_grad=True)
    loss = cuda_ops.cross_entropy(logits, torch.full((3,), -1), ignore_index=-1)
    assert torch.isnan(loss)


def test_wiring_cross_entropy_without_grad_skips_the_gradient_buffer(emulated, monkeypatch):
    seen = []
    real = emulated.cross_entropy_fwd
    monkeypatch.setattr(cuda_ops, "_ops", lambda: type("Ops", (), {
        "cross_entropy_fwd": staticmethod(lambda *a: seen.append(a[3]) or real(*a))}))
    logits, targets = _ce_case((4, 9), torch.float32)
    with torch.no_grad():
        cuda_ops.cross_entropy(logits.requires_grad_(True), targets)
    cuda_ops.cross_entropy(logits.detach(), targets)
    cuda_ops.cross_entropy(logits.requires_grad_(True), targets)
    assert seen == [False, False, True]


def test_wiring_second_backward_through_the_same_graph_is_refused(emulated):
    logits, targets = _ce_case((4, 9), torch.float32)
    logits.requires_grad_(True)
    loss = cuda_ops.cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_wiring_out_of_range_target_gives_nan_and_check_targets_names_it(emulated):
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.tensor([1, 7, -100])
    per_row = cuda_ops.cross_entropy(logits, targets, reduction="none")
    assert torch.isnan(per_row[1]) and not torch.isnan(per_row[0]) and per_row[2] == 0
    assert torch.isnan(cuda_ops.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="targets contains 7, outside \\[0, 5\\)"):
        cuda_ops.check_targets(logits, targets)
    cuda_ops.check_targets(logits, torch.tensor([1, 4, -100]))  # fine


@pytest.mark.parametrize("want_grad", [True, False])
def test_wiring_opcheck_fake_and_autograd_registration(emulated, want_grad):
    logits, targets = _ce_case((5, 11), torch.float32)
    torch.library.opcheck(emulated.cross_entropy_fwd, (logits.requires_grad_(want_grad), targets, -100, want_grad))
    torch.library.opcheck(emulated.sample_next_token, (logits.detach(), None, 0.0, None, 11, None))


def test_wiring_sampling_maps_arguments_to_the_kernel(emulated):
    logits = torch.randn(3, 10)
    temps, ks = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1, 4, 10])
    gen = torch.Generator().manual_seed(1234)
    out = cuda_ops.sample_next_token(logits, temperature=0.7, top_k=None)
    assert out.shape == (3, 1) and out.dtype == torch.int64
    cuda_ops.sample_next_token(logits, temperature=temps, top_k=5, generator=gen)
    cuda_ops.sample_next_token(logits, temperature=0.0, top_k=ks)
    (t0, tv0, k0, kv0, g0), (t1, tv1, k1, kv1, g1), (t2, tv2, k2, kv2, _) = _sampling_calls
    assert t0 is None and tv0 == 0.7 and k0 is None and kv0 == 10 and g0 is None  # no top_k: keep all
    assert torch.equal(t1, temps) and k1 is None and kv1 == 5 and g1.initial_seed() == 1234
    assert t2 is None and tv2 == 0.0 and torch.equal(k2, ks)


# --------------------------------------------------------------------------- kernels on a CUDA device


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", parity.CROSS_ENTROPY_SHAPES)
def test_cross_entropy_parity(shape, dtype, reduction):
    parity.check_cross_entropy_parity("cuda", shape, dtype, device="cuda", reduction=reduction)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [0, -1, 7])
def test_cross_entropy_other_ignore_index(dtype, ignore_index):
    parity.check_cross_entropy_parity("cuda", (9, 257), dtype, device="cuda", ignore_index=ignore_index,
                                      ignore_fraction=0.3)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 1023, 50257])
def test_cross_entropy_unaligned_strided_rows_and_int32_targets(dtype, vocab):
    """Rows that start at every alignment (a column slice) and int32 targets."""
    g = torch.Generator().manual_seed(1)
    wide = (torch.randn(6, vocab + 3, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (6,), generator=g)
    for start in range(3):
        base = wide.cuda()[:, start:start + vocab]  # row stride vocab + 3, offset start
        x1 = base.detach().requires_grad_(True)
        loss = ops.cross_entropy(x1, targets.cuda().int(), reduction="sum", backend="cuda")
        loss.backward()
        x2 = wide[:, start:start + vocab].double().requires_grad_(True)
        ref = torch_ops.cross_entropy(x2, targets, reduction="sum")
        ref.backward()
        parity.assert_close(loss.detach().cpu(), ref.detach(), dtype, f"loss start={start}")
        parity.assert_close(x1.grad.cpu(), x2.grad, dtype, f"grad start={start}")


@needs_cuda
def test_cross_entropy_3d_logits_and_no_grad_forward():
    logits, targets = _ce_case((2, 33, 4097), torch.bfloat16)
    with torch.no_grad():
        loss = ops.cross_entropy(logits.cuda(), targets.cuda(), backend="cuda")
    ref = torch_ops.cross_entropy(logits.double(), targets)
    parity.assert_close(loss.cpu(), ref, torch.bfloat16, "3-D no-grad loss")


@needs_cuda
def test_cross_entropy_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-math.inf, 0.0, 1.0], [30.0, 30.0, 30.0]], device="cuda")
    targets = torch.tensor([0, 2, 1], device="cuda")
    x1 = logits.clone().requires_grad_(True)
    loss = ops.cross_entropy(x1, targets, reduction="none", backend="cuda")
    x2 = logits.cpu().double().requires_grad_(True)
    ref = torch_ops.cross_entropy(x2, targets.cpu(), reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad.double().cpu(), x2.grad, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cross_entropy_bad_target_is_nan_not_a_wild_read():
    logits = torch.randn(4, 50257, device="cuda", requires_grad=True)
    targets = torch.tensor([3, 50257, -5, -100], device="cuda")  # device values are not checked in Python
    per_row = ops.cross_entropy(logits, targets, reduction="none", backend="cuda")
    assert torch.isnan(per_row[1:3]).all() and torch.isfinite(per_row[0]) and per_row[3] == 0
    per_row.sum().backward()
    assert torch.isnan(logits.grad[1:3]).all() and torch.isfinite(logits.grad[0]).all()
    assert (logits.grad[3] == 0).all()
    with pytest.raises(ValueError, match="targets contains 50257"):
        cuda_ops.check_targets(logits, targets)


@needs_cuda
def test_cross_entropy_no_host_sync_and_torch_compile():
    logits, targets = _ce_case((16, 1000), torch.float32)
    logits, targets = logits.cuda().requires_grad_(True), targets.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ops.cross_entropy(logits, targets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_grad = logits.grad.clone()
    logits.grad = None
    compiled = torch.compile(lambda x, t: cuda_ops.cross_entropy(x, t), fullgraph=True)
    loss = compiled(logits, targets)
    loss.backward()
    torch.testing.assert_close(loss, cuda_ops.cross_entropy(logits.detach(), targets))
    torch.testing.assert_close(logits.grad, eager_grad)


@needs_cuda
@pytest.mark.parametrize("want_grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_opcheck(dtype, want_grad):
    logits, targets = _ce_case((6, 1001), dtype)
    torch.library.opcheck(torch.ops.gptfast_cuda.cross_entropy_fwd,
                          (logits.cuda().requires_grad_(want_grad), targets.cuda(), -100, want_grad))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 50257])
def test_sampling_greedy_is_argmax(dtype, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, vocab, generator=g) * 3).to(dtype).cuda()
    logits[0, :] = 1.0  # all tied: the first index
    parity.check_sampling_greedy("cuda", logits)
    parity.check_sampling_greedy("cuda", logits, top_k=1)
    parity.check_sampling_greedy("cuda", logits, top_k=vocab)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,top_k,temperature", [(50, 7, 0.8), (50, 50, 1.3), (300, 1, 1.0), (5000, 20, 0.6)])
def test_sampling_distribution(dtype, vocab, top_k, temperature):
    parity.check_sampling_distribution("cuda", vocab=vocab, top_k=top_k, temperature=temperature, device="cuda",
                                       dtype=dtype)


@needs_cuda
def test_sampling_distribution_without_top_k():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(20, generator=g)
    draws = 20000
    logits = row.expand(draws, 20).contiguous().cuda()
    tokens = ops.sample_next_token(logits, temperature=1.0, backend="cuda").squeeze(1).cpu()
    counts = torch.bincount(tokens, minlength=20).double()
    expected = torch.softmax(row.double(), 0) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60.0, chi2  # 19 dof: the 99.99% quantile is about 50


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_support_at_gpt2_vocab_with_ties(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 50257, generator=g) * 2).to(dtype)
    logits[:, 100:110] = logits.float().max() + 1  # ten tied maxima
    logits = logits.cuda()
    for top_k in (1, 10, 11, 50, 1000):
        tokens = ops.sample_next_token(logits, temperature=1.0, top_k=top_k, backend="cuda")
        allowed = parity.top_k_support(logits, top_k)
        assert allowed.gather(1, tokens).all(), f"token outside the top-{top_k} set"
    tokens = ops.sample_next_token(logits, temperature=1.0, top_k=10, backend="cuda")
    assert ((tokens >= 100) & (tokens < 110)).all()


@needs_cuda
def test_sampling_reproducible_under_seed():
    logits = torch.randn(8, 50257, device="cuda")
    parity.check_sampling_reproducible("cuda", logits, device="cuda")
    torch.manual_seed(11)
    a = ops.sample_next_token(logits, temperature=1.0, backend="cuda")
    b = ops.sample_next_token(logits, temperature=1.0, backend="cuda")
    torch.manual_seed(11)
    assert torch.equal(a, ops.sample_next_token(logits, temperature=1.0, backend="cuda"))
    assert not torch.equal(a, b)  # the default generator's offset advances


@needs_cuda
def test_sampling_per_row_parameters_and_clamping():
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
def test_sampling_strided_rows_match_contiguous():
    logits = torch.randn(4, 7, 501, device="cuda", dtype=torch.bfloat16)
    last = logits[:, -1, :]  # rows 7 * 501 elements apart
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    a = ops.sample_next_token(last, temperature=0.9, top_k=40, generator=gen, backend="cuda")
    gen.manual_seed(3)
    b = ops.sample_next_token(last.contiguous(), temperature=0.9, top_k=40, generator=gen, backend="cuda")
    assert torch.equal(a, b)


@needs_cuda
def test_sampling_no_host_sync_and_cuda_graph_capture():
    logits = torch.randn(4, 50257, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ops.sample_next_token(logits, temperature=0.8, top_k=50)
        cuda_ops.sample_next_token(logits, temperature=torch.full((4,), 0.8, device="cuda"),
                                   top_k=torch.full((4,), 50, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        cuda_ops.sample_next_token(logits, temperature=0.8, top_k=50)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = cuda_ops.sample_next_token(logits, temperature=0.8, top_k=50)
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
def test_sampling_opcheck():
    logits = torch.randn(3, 300, device="cuda")
    op = torch.ops.gptfast_cuda.sample_next_token
    # greedy keeps the output deterministic, which opcheck's comparisons need
    torch.library.opcheck(op, (logits, None, 0.0, None, 300, None))
    torch.library.opcheck(op, (logits.half(), torch.zeros(3, device="cuda"), 1.0,
                               torch.tensor([1, 2, 3], device="cuda"), 300, None))


@needs_cuda
def test_sampling_rejects_bad_per_row_tensors_in_the_binding():
    logits = torch.randn(3, 10, device="cuda")
    with pytest.raises(ValueError, match="temperature must have shape"):
        torch.ops.gptfast_cuda.sample_next_token(logits, torch.ones(2, device="cuda"), 0.0, None, 10, None)
    with pytest.raises(TypeError, match="top_k must be"):
        torch.ops.gptfast_cuda.sample_next_token(logits, None, 1.0, torch.ones(3, device="cuda"), 10, None)
    with pytest.raises(TypeError, match="logits must be float32"):
        torch.ops.gptfast_cuda.cross_entropy_fwd(logits.double(), torch.zeros(3, dtype=torch.long, device="cuda"),
                                                 -100, False)
