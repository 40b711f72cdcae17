"""Backend "cuda" causal attention (csrc/cuda attention kernels, gptfast/ops/cuda_attention.py).

CPU-side tests run everywhere: the module imports without CUDA, refuses unsupported
inputs with a reason, and routes calls (decode kernel vs fused fwd, dropout seed).
GPU tests compare with the torch oracle (float64) and are skipped only when no CUDA
device exists.

Tolerances: ``tests/parity.py`` TOLERANCES (fp16 atol=rtol=2e-3, bf16 atol=rtol=2e-2
on the output; gradients get a sqrt(Tk)-growing factor there).  The kernels round
the probabilities to fp16/bf16 before the P.V product and accumulate in fp32, like
FlashAttention.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from gptfast import ops
from gptfast.ops import cuda_attention, torch_ops
from parity import ATTENTION_SHAPES, assert_close, check_attention_parity, tol

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16]

# The shared list (head dims 16/32 run zero-padded to 64) plus tile edges:
# T=1, exactly one tile, one past a tile, odd Tq < Tk, longer sequences, padded 96 -> 128.
CUDA_SHAPES = ATTENTION_SHAPES + [
    (1, 1, 1, 1, 64),
    (1, 1, 1, 1, 128),
    (2, 3, 17, 17, 64),
    (1, 1, 64, 64, 64),
    (1, 2, 65, 65, 128),
    (2, 2, 127, 200, 64),
    (1, 3, 31, 513, 128),
    (2, 2, 300, 300, 64),
    (1, 2, 1024, 1024, 64),
    (2, 2, 50, 50, 96),
]


def _qkv(shape, dtype, device, seed=0, requires_grad=False):
    b, h, tq, tk, d = shape
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype) for t in (tq, tk, tk)]
    return [t.requires_grad_(requires_grad) for t in tensors]


# --------------------------------------------------------------------------- CPU-side


def test_module_imports_without_cuda():
    assert callable(cuda_attention.causal_attention)
    assert callable(cuda_attention.attention_unsupported_reason)
    if cuda_attention._C_cuda is None:
        assert "not built" in cuda_attention._IMPORT_ERROR


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unsupported_dtype_reason(dtype):
    q, k, v = _qkv((1, 2, 5, 5, 64), dtype, "cpu")
    reason = cuda_attention.attention_unsupported_reason(q, k, v, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "float16/bfloat16" in reason and str(dtype) in reason


@pytest.mark.parametrize("head_dim", [129, 192, 256])
def test_unsupported_head_dim_reason(head_dim):
    q, k, v = _qkv((1, 2, 5, 5, head_dim), torch.float16, "cpu")
    reason = cuda_attention.attention_unsupported_reason(q, k, v, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "head_dim" in reason and str(head_dim) in reason


@pytest.mark.parametrize("head_dim", cuda_attention.HEAD_DIMS)
def test_cpu_tensors_are_refused(head_dim):
    q, k, v = _qkv((1, 2, 5, 5, head_dim), torch.bfloat16, "cpu")
    reason = cuda_attention.attention_unsupported_reason(q, k, v, dropout_p=0.0, training=False, scale=None)
    assert reason is not None  # not built here, or built but these are CPU tensors


def test_huge_batch_reason():
    q = torch.empty(70000, 1, 1, 64, dtype=torch.float16)
    reason = cuda_attention.attention_unsupported_reason(q, q, q, dropout_p=0.0, training=False, scale=None)
    assert reason is not None and "65535" in reason


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's backend status")
def test_cuda_backend_unavailable_without_gpu():
    assert ops.backend_status()["cuda"] != "available"
    q, k, v = _qkv((1, 2, 5, 5, 64), torch.float16, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.causal_attention(q, k, v, backend="cuda")


class _RecordingOps:
    """Stands in for torch.ops.gptfast_cuda: records which kernel a call would launch."""

    def __init__(self):
        self.calls = []

    def decode_attention(self, q, k, v, scale):
        self.calls.append(("decode", scale, None, None))
        return torch.zeros_like(q)

    def attention_fwd(self, q, k, v, scale, dropout_p, seed):
        self.calls.append(("fwd", scale, dropout_p, seed))
        return torch.zeros_like(q), torch.zeros(q.shape[:3])


@pytest.fixture
def recorder(monkeypatch):
    rec = _RecordingOps()
    monkeypatch.setattr(cuda_attention, "_ops", lambda: rec)
    return rec


def test_single_query_without_grad_uses_decode_kernel(recorder):
    q, k, v = _qkv((1, 2, 1, 40, 64), torch.float16, "cpu")
    cuda_attention.causal_attention(q, k, v, dropout_p=0.1, training=False, scale=None)
    assert recorder.calls == [("decode", 1 / 8, None, None)]


def test_single_query_with_grad_uses_fused_kernel(recorder):
    q, k, v = _qkv((1, 2, 1, 40, 64), torch.float16, "cpu", requires_grad=True)
    cuda_attention.causal_attention(q, k, v, dropout_p=0.0, training=True, scale=0.5)
    assert recorder.calls == [("fwd", 0.5, 0.0, None)]
    with torch.no_grad():
        cuda_attention.causal_attention(q, k, v, dropout_p=0.0, training=True, scale=0.5)
    assert recorder.calls[-1][0] == "decode"


def test_single_query_with_dropout_uses_fused_kernel(recorder):
    q, k, v = _qkv((1, 2, 1, 40, 128), torch.float16, "cpu")
    cuda_attention.causal_attention(q, k, v, dropout_p=0.25, training=True, scale=None)
    kind, scale, p, seed = recorder.calls[0]
    assert (kind, p) == ("fwd", 0.25) and scale == pytest.approx(1 / math.sqrt(128))
    assert seed.dtype == torch.int64 and seed.shape == (1,)


@pytest.mark.parametrize("head_dim,kernel_dim", [(16, 64), (40, 64), (80, 128), (96, 128)])
def test_small_head_dims_are_zero_padded(recorder, head_dim, kernel_dim):
    q, k, v = _qkv((1, 2, 6, 9, head_dim), torch.float16, "cpu")
    assert cuda_attention.attention_unsupported_reason(q, k, v) is not None  # CPU tensors / not built
    seen = []

    def fwd(q_, k_, v_, scale, dropout_p, seed):
        seen.append((q_, k_, v_, scale))
        return q_ * 2, torch.zeros(q_.shape[:3])

    recorder.attention_fwd = fwd
    out = cuda_attention.causal_attention(q, k, v, dropout_p=0.0, training=False, scale=None)
    q_, k_, v_, scale = seen[0]
    assert q_.shape[-1] == k_.shape[-1] == v_.shape[-1] == kernel_dim
    assert scale == pytest.approx(1 / math.sqrt(head_dim))  # the unpadded dim sets the scale
    assert torch.equal(q_[..., :head_dim], q) and not q_[..., head_dim:].any()
    assert torch.equal(out, q * 2)


def test_dropout_only_in_training_and_seed_follows_manual_seed(recorder):
    q, k, v = _qkv((1, 2, 9, 9, 64), torch.bfloat16, "cpu")
    cuda_attention.causal_attention(q, k, v, dropout_p=0.5, training=False, scale=None)
    assert recorder.calls[-1][2:] == (0.0, None)
    seeds = []
    for manual in (3, 3, 4):
        torch.manual_seed(manual)
        cuda_attention.causal_attention(q, k, v, dropout_p=0.5, training=True, scale=None)
        seeds.append(int(recorder.calls[-1][3]))
    assert seeds[0] == seeds[1] != seeds[2]


# --------------------------------------------------------------------------- kernels in the CPU emulator

REPO = pathlib.Path(__file__).resolve().parents[1]
EMULATOR_DIR = pathlib.Path(__file__).resolve().parent / "cuda_emulator"
KERNEL_FILES = ("attention_fwd.cu", "attention_bwd.cu", "decode_attention.cu")


def _split_top_level(args: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in args:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _emulator_sources(out_dir: pathlib.Path) -> None:
    """The kernel files, made host-compilable: PTX region cut out, ``<<<...>>>`` launches rewritten."""
    src = REPO / "csrc" / "cuda"
    gen = out_dir / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    common = (src / "attention_common.cuh").read_text().replace("#ifdef __CUDACC__", "#if 1")
    common, n = re.subn(r"// BEGIN PTX PRIMITIVES.*?// END PTX PRIMITIVES\n", "", common, flags=re.S)
    assert n == 1, "attention_common.cuh lost its PTX PRIMITIVES markers"
    (gen / "attention_common.cuh").write_text(common)
    shutil.copy(src / "philox.cuh", gen / "philox.cuh")
    launch = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\((\w+)\)", flags=re.S)
    for name in KERNEL_FILES:
        text = (src / name).read_text().replace(
            "extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu::dyn_smem;")
        text, n = launch.subn(
            lambda m: f"emu::launch({m.group(1)}, {','.join(_split_top_level(m.group(2))[:3])}, {m.group(3)})", text)
        assert n >= 1, f"no kernel launch found in {name}"
        (gen / f"{name}.inc").write_text(text)


def _emulator_prerequisite_missing() -> str | None:
    cuda_home = pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if shutil.which("g++") is None:
        return "g++ not found"
    if not (cuda_home / "include" / "cuda_fp16.h").exists():
        return f"CUDA headers not found under {cuda_home}/include (set CUDA_HOME)"
    return None


@pytest.mark.slow
def test_kernels_match_float64_reference_in_cpu_emulator(tmp_path):
    """fwd, bwd (dq/dk/dv, lse) and decode kernels, run by a CPU emulator of the CUDA/PTX subset they use.

    Checks everything but the hardware itself: tiling, causal offsets, fragment layouts,
    cp.async ordering, strided inputs, dropout mask regeneration, split-key combine.
    """
    missing = _emulator_prerequisite_missing()
    if missing:
        pytest.skip(missing)
    _emulator_sources(tmp_path)
    exe = tmp_path / "attention_check"
    cuda_include = pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "include"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-w", "-pthread", f"-I{cuda_include}", f"-I{tmp_path}", f"-I{EMULATOR_DIR}",
         str(EMULATOR_DIR / "attention_check.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe), "quick"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "0 failures" in run.stdout


# --------------------------------------------------------------------------- GPU parity


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_parity_with_torch(shape, dtype):
    check_attention_parity("cuda", shape, dtype, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_explicit_scale(dtype):
    check_attention_parity("cuda", (2, 2, 45, 70, 64), dtype, device="cuda", scale=0.3)


def _oracle_grads(q, k, v, grad_out, scale=None, mask=None, p=0.0):
    """Output and (dq, dk, dv) of the float64 oracle; ``mask`` (keep=1) replaces random dropout."""
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    if mask is None:
        out = torch_ops.causal_attention(*leaves, scale=scale)
    else:
        ql, kl, vl = leaves
        scores = ql @ kl.transpose(2, 3)
        scores = scores.masked_fill(torch_ops.causal_mask(ql.shape[2], kl.shape[2], "cpu"), -torch.inf)
        scores = scores / kl.shape[-1] ** 0.5 if scale is None else scores * scale
        weights = torch.softmax(scores, dim=-1) * mask.double().cpu() / (1 - p)
        out = weights @ vl
    out.backward(grad_out.double().cpu())
    return out.detach(), [t.grad for t in leaves]


def _assert_grads_close(grads, ref_grads, dtype, tk, what):
    grow = math.sqrt(max(tk, 1) / 16) + 1
    t = tol(dtype)
    for name, mine, theirs in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(mine.double().cpu(), theirs, atol=t["atol"] * grow, rtol=t["rtol"] * grow,
                                   msg=lambda m: f"{what} {name}: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_views_and_strided_grad(dtype):
    """The model passes (B, T, H, D) projections transposed to (B, H, T, D); grad_out may be strided too."""
    b, t, h, d = 2, 77, 4, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, t, 3, h, d, generator=g).to("cuda", dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    grad_out = torch.randn(b, t, h, d, generator=g).to("cuda", dtype).transpose(1, 2)
    out = ops.causal_attention(q, k, v, backend="cuda")
    out.backward(grad_out)
    ref, ref_grads = _oracle_grads(q, k, v, grad_out)
    assert_close(out.detach().cpu(), ref, dtype, "strided output")
    dq, dk, dv = qkv.grad.permute(2, 0, 3, 1, 4)
    _assert_grads_close((dq, dk, dv), ref_grads, dtype, t, "strided")


@needs_cuda
def test_misaligned_and_non_contiguous_inputs():
    """Rows that are not 16-byte aligned or not contiguous along D are copied, not misread."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3 * 2 * 33 * 64 + 1, generator=g).to("cuda", dtype)
    q = base[1:].view(3, 2, 33, 64)[:1]  # storage offset of one element: misaligned
    k = torch.randn(1, 2, 64, 33, generator=g).to("cuda", dtype).transpose(2, 3)  # D not contiguous
    v = torch.randn(1, 2, 33, 64, generator=g).to("cuda", dtype)
    out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    assert_close(out.cpu(), ref, dtype, "misaligned output")


# --------------------------------------------------------------------------- dropout


def _probe_dropout_mask(b, h, tq, tk, dtype, p):
    """The kept/dropped pattern the kernel uses under the current RNG state.

    With q = k = 0 every visible key gets weight 1 / (position + 1), and v = identity
    (head dim = tk) copies each weight into its own output column, so the output
    reveals the mask element by element.
    """
    q = torch.zeros(b, h, tq, tk, device="cuda", dtype=dtype)
    k = torch.zeros(b, h, tk, tk, device="cuda", dtype=dtype)
    v = torch.eye(tk, device="cuda", dtype=dtype).expand(b, h, tk, tk).contiguous()
    out = ops.causal_attention(q, k, v, dropout_p=p, training=True, backend="cuda").float().cpu()
    positions = torch.arange(tk - tq, tk, dtype=torch.float32).view(1, 1, tq, 1)
    ratio = out * (positions + 1) * (1 - p)  # 1 where kept, 0 where dropped or masked
    visible = ~torch_ops.causal_mask(tq, tk, "cpu")
    assert torch.all((ratio - ratio.round()).abs() < 0.05), "dropout output not in {0, 1/(1-p)} x weight"
    assert torch.all(ratio[..., ~visible] == 0), "weights leaked past the causal mask"
    return ratio.round().bool() & visible, visible


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(dtype, p):
    torch.manual_seed(0)
    kept, visible = _probe_dropout_mask(4, 4, 128, 128, dtype, p)
    n = int(visible.sum()) * 16
    dropped_fraction = 1 - int(kept.sum()) / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped_fraction - p) < 6 * sigma, f"dropped {dropped_fraction:.4f}, expected {p}"
    # Neighbouring rows/columns/heads must not share one pattern (a broken counter would repeat it).
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    assert not torch.equal(kept[0, 0, 100:, :64], kept[0, 0, 100:, 64:])


@needs_cuda
def test_dropout_reproducible_under_manual_seed():
    q, k, v = _qkv((2, 3, 50, 50, 64), torch.bfloat16, "cuda")
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(ops.causal_attention(q, k, v, dropout_p=0.2, training=True, backend="cuda"))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 64, 64, 64), (1, 3, 40, 128, 128), (1, 2, 128, 128, 128)], ids=str)
def test_dropout_backward_uses_forward_mask(shape, dtype):
    """Output and gradients equal the oracle's with the kernel's own mask (read back with a probe)."""
    b, h, tq, tk, d = shape
    p = 0.3
    torch.manual_seed(11)
    kept, _ = _probe_dropout_mask(b, h, tq, tk, dtype, p)  # the mask depends only on seed and position
    q, k, v = _qkv(shape, dtype, "cuda", seed=3, requires_grad=True)
    grad_out = torch.randn(b, h, tq, d, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    torch.manual_seed(11)
    out = ops.causal_attention(q, k, v, dropout_p=p, training=True, backend="cuda")
    out.backward(grad_out)
    ref, ref_grads = _oracle_grads(q, k, v, grad_out, mask=kept, p=p)
    assert_close(out.detach().cpu(), ref, dtype, f"dropout output {shape}")
    _assert_grads_close((q.grad, k.grad, v.grad), ref_grads, dtype, tk, f"dropout {shape}")


@needs_cuda
def test_dropout_one_gives_zeros():
    q, k, v = _qkv((1, 2, 20, 20, 64), torch.float16, "cuda", requires_grad=True)
    out = ops.causal_attention(q, k, v, dropout_p=1.0, training=True, backend="cuda")
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(v.grad) == 0 and torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------- decode


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,h,tk,d", [(1, 12, 1, 64), (1, 12, 7, 64), (1, 12, 64, 64), (1, 12, 1000, 64),
                                      (1, 12, 4097, 64), (1, 12, 8192, 64), (3, 5, 333, 128),
                                      (1, 8, 8192, 128), (16, 12, 1024, 64)])
def test_decode_kernel_matches_oracle(b, h, tk, d, dtype):
    q, k, v = _qkv((b, h, 1, tk, d), dtype, "cuda", seed=tk)
    direct = torch.ops.gptfast_cuda.decode_attention(q, k, v, 1 / math.sqrt(d))
    with torch.no_grad():
        routed = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    assert_close(direct.cpu(), ref, dtype, f"decode {(b, h, tk, d)}")
    assert_close(routed.cpu(), ref, dtype, f"routed decode {(b, h, tk, d)}")


@needs_cuda
def test_decode_reads_a_strided_kv_cache():
    """A KV cache preallocated for 256 positions and sliced to the filled 150."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(9)
    cache_k = torch.randn(2, 4, 256, 64, generator=g).to("cuda", dtype)
    cache_v = torch.randn(2, 4, 256, 64, generator=g).to("cuda", dtype)
    q = torch.randn(2, 1, 4, 64, generator=g).to("cuda", dtype).transpose(1, 2)
    k, v = cache_k[:, :, :150], cache_v[:, :, :150]
    with torch.no_grad():
        out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    assert_close(out.cpu(), ref, dtype, "strided cache decode")


@needs_cuda
def test_decode_with_padded_head_dim():
    q, k, v = _qkv((2, 3, 1, 129, 32), torch.float16, "cuda")
    with torch.no_grad():
        out = ops.causal_attention(q, k, v, backend="cuda")
    ref = torch_ops.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    assert_close(out.cpu(), ref, torch.float16, "padded decode")


# --------------------------------------------------------------------------- registration


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_attention_fwd(dtype):
    q, k, v = _qkv((1, 2, 33, 70, 64), dtype, "cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.gptfast_cuda.attention_fwd.default, (q, k, v, 0.125, 0.0, None))
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.gptfast_cuda.attention_fwd.default, (q, k, v, 0.125, 0.1, seed))


@needs_cuda
def test_opcheck_attention_bwd_and_decode():
    q, k, v = _qkv((2, 2, 19, 19, 128), torch.float16, "cuda")
    out, lse = torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.0, None)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.gptfast_cuda.attention_bwd.default,
                          (grad_out, q, k, v, out, lse, 0.1, 0.0, None))
    q1, k1, v1 = _qkv((2, 3, 1, 300, 64), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.gptfast_cuda.decode_attention.default, (q1, k1, v1, 0.125))


@needs_cuda
def test_torch_compile_matches_eager():
    q, k, v = _qkv((2, 2, 100, 100, 64), torch.bfloat16, "cuda", requires_grad=True)

    def fn(q, k, v):  # the backend function itself: the dispatch layer is not what is tested here
        return cuda_attention.causal_attention(q, k, v, dropout_p=0.0, training=False, scale=None).float().square().sum()

    eager = fn(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    cgrads = torch.autograd.grad(compiled, (q, k, v))
    # Same kernels either way; only inductor's fused square-sum may add in another order.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for a, b_ in zip(cgrads, grads):
        torch.testing.assert_close(a, b_, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- bad input on the GPU


@needs_cuda
def test_explicit_backend_refuses_unsupported_inputs():
    q, k, v = _qkv((1, 2, 5, 5, 64), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        ops.causal_attention(q, k, v, backend="cuda")
    q, k, v = _qkv((1, 2, 5, 5, 192), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.causal_attention(q, k, v, backend="cuda")
    # "auto" falls back instead of failing
    assert ops.selected_backend("causal_attention", q, k, v) != "cuda"


@needs_cuda
def test_op_called_directly_rejects_bad_shapes():
    q, k, v = _qkv((1, 2, 5, 5, 96), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.0, None)
    q, k, v = _qkv((1, 2, 9, 5, 64), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="Tq"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.0, None)
    q, k, v = _qkv((1, 2, 5, 5, 64), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.gptfast_cuda.attention_fwd(q, k, v, 0.1, 0.5, None)
    with pytest.raises(RuntimeError, match="one token"):
        torch.ops.gptfast_cuda.decode_attention(q, k, v, 0.1)
