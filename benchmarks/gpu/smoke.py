#!/usr/bin/env python3
"""Smoke run: every CUDA and Triton kernel once, on small odd shapes, one OK/FAIL line each.

Each case goes through the public ``gptfast.ops`` API with an explicit ``backend=`` (forward,
backward, KV-cache decode, dropout, non-contiguous inputs) and is compared with the torch
backend on the same inputs.  Then, per backend:

* coverage: every op the CUDA extension registered (found from the dispatcher, no names written
  here) and every ``@triton.jit`` kernel of ``gptfast.triton_kernels`` was launched at least once;
* fakes (CUDA): for the first call of each extension op, its fake implementation is run on fake
  copies of the same arguments and must give the shapes, dtypes and strides the kernel gave.

    python3 benchmarks/gpu/smoke.py                       # backends cuda,triton on the GPU
    python3 benchmarks/gpu/smoke.py --device cpu --backends torch --dtypes float32   # dry run

Lines: ``OK|FAIL|SKIP  <backend>  <case>  <detail>``; ``--jsonl`` appends one JSON object per line.
Exit status 1 if any line is FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # relative, tf32 for fp32 dots


class Reporter:
    def __init__(self, jsonl: str | None):
        self.jsonl = jsonl
        self.counts = {"OK": 0, "FAIL": 0, "SKIP": 0}

    def line(self, status: str, backend: str, case: str, detail: str = "") -> None:
        self.counts[status] += 1
        print(f"{status:4s}  {backend:7s}  {case:52s}  {detail}", flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"kind": "smoke", "status": status, "backend": backend, "case": case,
                                    "detail": detail}) + "\n")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------- cases


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def case_list(device: str, dtypes: list[torch.dtype]):
    """(name, dtype, run(backend) -> list of tensors to compare, compare?)"""
    from gptfast import ops

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cases = []
    for dtype in dtypes:
        b, h, t, d = 2, 3, 37, 64

        def attention(backend, dtype=dtype, layout="bhtd", tq=None, dropout=0.0, data={}):
            key = (layout, dtype)
            if key not in data:  # same inputs for the backend and the torch reference
                shape = (b, h, t, d) if layout == "bhtd" else (b, t, h, d)
                data[key] = [randn(*shape, dtype=dtype) for _ in range(3)]
            q, k, v = (x if layout == "bhtd" else x.transpose(1, 2) for x in data[key])
            if tq is not None:
                q = q[:, :, -tq:]
            q, k, v = _leaves(q, k, v)  # clone keeps the transposed strides
            out = ops.causal_attention(q, k, v, dropout_p=dropout, training=dropout > 0, backend=backend)
            if tq is not None:
                return [out]
            out.float().square().sum().backward()
            return [out, q.grad, k.grad, v.grad]

        shape = f"B{b} H{h} T{t} D{d}"
        cases += [
            (f"attention fwd+bwd {shape}", dtype, attention, True),
            (f"attention fwd+bwd transposed {shape}", dtype, lambda be, f=attention: f(be, layout="bthd"), True),
            (f"attention decode Tq1 Tk{t}", dtype, lambda be, f=attention: f(be, tq=1), True),
            (f"attention decode transposed Tq1 Tk{t}", dtype, lambda be, f=attention: f(be, layout="bthd", tq=1),
             True),
            (f"attention dropout0.1 fwd+bwd {shape}", dtype, lambda be, f=attention: f(be, dropout=0.1), False),
        ]

        n, v = 37, 1031

        def cross_entropy(backend, dtype=dtype, transposed=False, data={}):
            key = (dtype, transposed)
            if key not in data:
                logits = randn(v, n, dtype=dtype).t() if transposed else randn(n, v, dtype=dtype)
                targets = torch.randint(0, v, (n,), generator=g).to(device)
                targets[::5] = -100
                data[key] = (logits, targets)
            logits, targets = data[key]
            x = logits.detach().clone() if not transposed else logits.detach().t().clone().t()
            x.requires_grad_(True)
            loss = ops.cross_entropy(x, targets, backend=backend)
            loss.backward()
            rows = ops.cross_entropy(x.detach(), targets, reduction="none", backend=backend)
            return [loss, rows, x.grad]

        cases += [
            (f"cross_entropy fwd+bwd N{n} V{v} ignore_index", dtype, cross_entropy, True),
            (f"cross_entropy fwd+bwd transposed N{n} V{v}", dtype, lambda be, f=cross_entropy: f(be, transposed=True),
             True),
        ]

        nh, hidden, vocab = 29, 64, 517

        def linear_cross_entropy(backend, dtype=dtype, data={}):
            if dtype not in data:
                data[dtype] = (randn(nh, hidden, dtype=dtype), randn(vocab, hidden, dtype=dtype) * 0.1,
                               torch.randint(0, vocab, (nh,), generator=g).to(device))
            x, w, targets = data[dtype]
            x, w = _leaves(x, w)
            loss = ops.linear_cross_entropy(x, w, targets, backend=backend)
            loss.backward()
            return [loss, x.grad, w.grad]

        cases.append((f"linear_cross_entropy fwd+bwd N{nh} H{hidden} V{vocab}", dtype, linear_cross_entropy, True))

        def sample(backend, dtype=dtype, data={}):
            if dtype not in data:
                data[dtype] = randn(5, 1031, dtype=dtype)
            logits = data[dtype]
            tokens = ops.sample_next_token(logits, temperature=0.8, top_k=7, backend=backend)
            top = logits.float().topk(7, dim=-1).indices
            inside = (top == tokens.reshape(-1, 1)).any(dim=-1)
            if not bool(inside.all()):
                raise AssertionError(f"sampled ids {tokens.flatten().tolist()} outside each row's top-7")
            return [tokens]

        cases.append(("sample_next_token B5 V1031 top_k7 T0.8", dtype, sample, False))
        cases += layer_cases(device, dtype, randn)
    return cases


def layer_cases(device, dtype, randn):
    """The Llama/Qwen layer ops (RMSNorm, RoPE, SwiGLU) fwd+bwd, dropout and the decode-step linear, odd shapes."""
    from gptfast import ops

    data = {}

    def inputs(name, make):
        if name not in data:  # the same inputs for the backend and the torch reference
            data[name] = make()
        return data[name]

    def rms_norm(backend):
        x, w = _leaves(*inputs("rms", lambda: (randn(7, 129, dtype=dtype), randn(129, dtype=torch.float32))))
        out = ops.rms_norm(x, w, eps=1e-6, backend=backend)
        out.float().square().sum().backward()
        return [out, x.grad, w.grad]

    def rope(backend):
        def make():  # float32 tables of 40 positions, as the models keep them
            angles = torch.outer(torch.arange(40.0), torch.rand(32, generator=torch.Generator().manual_seed(1)))
            table = torch.cat([angles] * 2, -1).to(device)
            return randn(2, 3, 9, 64, dtype=dtype), table.cos(), table.sin()
        x, cos, sin = inputs("rope", make)
        (x,) = _leaves(x)
        out = ops.rope(x, cos, sin, offset=5, backend=backend)
        out.float().square().sum().backward()
        return [out, x.grad]

    def swiglu(backend):
        gate, up = _leaves(*inputs("swiglu", lambda: (randn(5, 301, dtype=dtype), randn(5, 301, dtype=dtype))))
        out = ops.swiglu(gate, up, backend=backend)
        out.float().square().sum().backward()
        return [out, gate.grad, up.grad]

    def dropout(backend):
        (x,) = _leaves(*inputs("dropout", lambda: (randn(7, 301, dtype=dtype),)))
        if backend == "torch":  # the kernels' mask by its definition (F.dropout draws another one)
            from gptfast.ops.regularization import keep_mask
            keep = keep_mask(77, x.numel(), 0.3).reshape(x.shape).to(device)
            return [(x.detach().float() * torch.where(keep, 1.0 / 0.7, 0.0)).to(dtype)]
        seed = torch.tensor([77], dtype=torch.int64, device=device)
        return [getattr(torch.ops, f"gptfast_{backend}").dropout_fwd(x.detach(), 0.3, seed)]

    def decode_linear(backend, rows):
        x, w, b = inputs(f"linear{rows}", lambda: (randn(rows, 197, dtype=dtype), randn(131, 197, dtype=dtype),
                                                    randn(131, dtype=dtype)))
        return [ops.decode_linear(x, w, b, backend=backend)]

    return [
        ("rms_norm fwd+bwd 7x129 fp32 weight", dtype, rms_norm, True),
        ("rope fwd+bwd B2 H3 T9 D64 offset5", dtype, rope, True),
        ("swiglu fwd+bwd 5x301", dtype, swiglu, True),
        ("dropout fwd 7x301 p0.3 (the mask's definition)", dtype, dropout, True),
        ("decode_linear M1 N131 K197 bias", dtype, lambda be: decode_linear(be, 1), True),
        ("decode_linear M8 N131 K197 bias", dtype, lambda be: decode_linear(be, 8), True),
    ]


# ----------------------------------------------------------------------------- coverage and fakes


def extension_ops() -> list[str]:
    """Ops registered by gptfast._C_cuda (dispatcher names before/after importing it), [] if not built."""
    before = set(torch._C._dispatch_get_all_op_names())
    try:
        import gptfast._C_cuda  # noqa: F401
    except ImportError:
        return []
    added = set(torch._C._dispatch_get_all_op_names()) - before
    if added:
        return sorted(added)
    # Imported earlier (by gptfast.ops): its ops are those of the namespaces it defines.
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("gptfast_cuda::"))


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Remembers the first call (args, kwargs, outputs) of each op in ``names``."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)
        self.first: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket._qualified_op_name
        if name in self.names and name not in self.first:
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.first[name] = (func, [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}, out)
        return out


def _meta(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.dtype, o.stride() if o.numel() > 1 else None) if isinstance(o, torch.Tensor) else None
            for o in outs]


def check_fakes(recorder: OpRecorder, report: Reporter) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, (func, args, kwargs, out) in sorted(recorder.first.items()):
        try:
            with FakeTensorMode() as mode:
                fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
                fake_out = func(*[fake(a) for a in args], **{k: fake(v) for k, v in kwargs.items()})
            real, faked = _meta(out), _meta(fake_out)
            if real == faked:
                report.line("OK", "cuda", f"fake {name}", "shapes, dtypes, strides match the kernel")
            else:
                report.line("FAIL", "cuda", f"fake {name}", f"kernel {real} vs fake {faked}")
        except Exception as exc:  # noqa: BLE001
            report.line("FAIL", "cuda", f"fake {name}", f"{type(exc).__name__}: {exc}"[:300])


def triton_kernel_names() -> dict[str, object]:
    """Every @triton.jit kernel in gptfast.triton_kernels' modules, by qualified name."""
    import importlib
    import pkgutil

    import triton

    import gptfast.triton_kernels as package

    kernels = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) or type(value).__name__ in ("Autotuner", "Heuristics"):
                kernels[f"{info.name}.{attr}"] = value
    return kernels


def count_triton_launches():
    """Patches JITFunction.run to count launches per kernel function name; returns the counter."""
    import collections

    import triton

    launches = collections.Counter()
    original = triton.runtime.jit.JITFunction.run

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    triton.runtime.jit.JITFunction.run = run
    try:  # the interpreter has its own launcher class
        from triton.runtime.interpreter import InterpretedFunction

        original_interp = InterpretedFunction.run

        def interp_run(self, *args, **kwargs):
            launches[self.fn.__name__] += 1
            return original_interp(self, *args, **kwargs)

        InterpretedFunction.run = interp_run
    except ImportError:
        pass
    return launches


# ----------------------------------------------------------------------------- main


def run_backend(backend, cases, device, report, reference="torch"):
    from gptfast import ops

    reason = ops.backend_status().get(backend)
    if reason is None:
        report.line("FAIL", backend, "backend", f"unknown backend; known: {sorted(ops.backend_status())}")
        return
    if reason != "available":
        for name, dtype, _, _ in cases:
            report.line("SKIP", backend, f"{name} {str(dtype)[6:]}", reason[:160])
        return
    for name, dtype, run, compare in cases:
        label = f"{name} {str(dtype)[6:]}"
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            got = run(backend)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            detail = f"{ms:7.1f} ms"
            if compare:
                torch.manual_seed(0)
                ref = run(reference)
                errors = [rel_err(a, r) for a, r in zip(got, ref)]
                worst = max(errors)
                detail += f"  max rel err {worst:.1e} (tol {TOLERANCE[dtype]:.0e})"
                if not worst <= TOLERANCE[dtype]:
                    report.line("FAIL", backend, label, detail + f"  per output {[f'{e:.1e}' for e in errors]}")
                    continue
            elif not all(torch.isfinite(t.float()).all() for t in got):
                report.line("FAIL", backend, label, detail + "  non-finite output")
                continue
            report.line("OK", backend, label, detail)
        except Exception as exc:  # noqa: BLE001
            report.line("FAIL", backend, label, f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc(limit=4, file=sys.stdout)
            if device == "cuda":  # a kernel fault poisons the context: say so once, keep going
                try:
                    torch.cuda.synchronize()
                except Exception as sync_exc:  # noqa: BLE001
                    report.line("FAIL", backend, "cuda context", f"unusable after the failure: {sync_exc}"[:200])
                    return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per result")
    args = parser.parse_args(argv)

    report = Reporter(args.jsonl)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if args.device == "cuda" and not torch.cuda.is_available():
        report.line("FAIL", "-", "device", "no CUDA device (torch.cuda.is_available() is False)")
    cases = case_list(args.device, dtypes)

    cuda_ops = extension_ops() if "cuda" in backends else []
    launches = None
    if "triton" in backends:
        try:
            launches = count_triton_launches()
        except ImportError as exc:
            report.line("FAIL", "triton", "import", str(exc))
    for backend in backends:
        if backend == "cuda" and cuda_ops:
            recorder = OpRecorder(cuda_ops)
            with recorder:
                run_backend(backend, cases, args.device, report)
            from gptfast import ops

            if ops.backend_status()["cuda"] == "available":
                missing = [op for op in cuda_ops if op not in recorder.first]
                report.line("FAIL" if missing else "OK", "cuda", "coverage of the extension's ops",
                            f"not called: {missing}" if missing else f"all {len(cuda_ops)} called")
                check_fakes(recorder, report)
        else:
            run_backend(backend, cases, args.device, report)
        if backend == "triton" and launches is not None:
            from gptfast import ops

            if ops.backend_status()["triton"] == "available":
                kernels = triton_kernel_names()
                called = {name for name in kernels if name.split(".")[-1] in launches}
                missing = sorted(set(kernels) - called)
                report.line("FAIL" if missing else "OK", "triton", "coverage of the @triton.jit kernels",
                            f"not launched: {missing}" if missing else f"all {len(kernels)} launched")
    print(f"smoke: {report.counts['OK']} OK, {report.counts['FAIL']} FAIL, {report.counts['SKIP']} SKIP", flush=True)
    return 1 if report.counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
