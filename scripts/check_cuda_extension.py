#!/usr/bin/env python3
"""Check the built CUDA extension on a machine without a GPU (run it in a venv with CUDA torch).

1. ``gptfast._C_cuda`` imports without a GPU, and the ops it registers are found by comparing the
   dispatcher's op list before and after the import (no op name is written here);
2. every one of those ops has a CUDA kernel and a fake (meta) implementation;
3. through the public ``gptfast.ops`` API, with ``backend="cuda"`` and fake CUDA tensors
   (``FakeTensorMode``; ``torch.cuda.is_available`` is faked to True so the backend is selected),
   the forward of every op (gradient-saving variants included) on contiguous and non-contiguous
   (transposed, sliced) inputs: every output of an extension op is contiguous (the kernels allocate
   contiguous outputs) and on the inputs' device (the GPU smoke run compares every fake with its kernel's
   real output, shapes and dtypes included).  Ops reached only from a backward are listed (autograd's engine needs a
   real device; the GPU smoke run compares those fakes with the kernels);
4. ``gptfast.ops.backend_status()["cuda"]`` says there is no CUDA device (not "not built").

Prints one line per check and exits non-zero on the first group that fails.
"""

from __future__ import annotations

import sys
import traceback


def fail(message: str) -> None:
    print(f"check_cuda_extension: FAIL {message}")
    sys.exit(1)


def registered_ops() -> list[str]:
    """Ops the extension registers: the dispatcher's op names that appear when it is imported."""
    import torch

    before = set(torch._C._dispatch_get_all_op_names())
    try:
        import gptfast._C_cuda  # noqa: F401
    except ImportError as exc:
        fail(f"gptfast._C_cuda does not import: {exc}")
    added = sorted(set(torch._C._dispatch_get_all_op_names()) - before)
    if not added:
        fail("importing gptfast._C_cuda registered no op")
    return added


def check_kernels(ops: list[str]) -> None:
    import torch

    missing_cuda = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    if missing_cuda:
        fail(f"no CUDA kernel registered for: {', '.join(missing_cuda)}")
    print(f"check_cuda_extension: {len(ops)} ops, each with a CUDA kernel: {', '.join(ops)}")


def has_fake(op: str) -> bool:
    import torch
    from torch._library.simple_registry import singleton

    if torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"):
        return True
    entry = singleton.find(op)
    return entry.fake_impl.kernel is not None


# ----------------------------------------------------------------------------- fake-tensor calls


def _empty(*shape, device, dtype):
    import torch

    return torch.empty(*shape, device=device, dtype=dtype)  # contents never matter to a fake


def _cases(torch):
    """(name, thunk(backend) -> tensors to compare) for every public op, on fake CUDA tensors."""
    import gptfast.ops as ops

    def leaf(t):
        return t.detach().requires_grad_(True)

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # cross-entropy: contiguous 2-D, transposed (V, N).T, and 3-D with a sliced vocabulary
        def ce(backend, dtype=dtype, layout="contiguous"):
            if layout == "contiguous":
                logits = leaf(_empty(37, 1031, device="cuda", dtype=dtype))
            elif layout == "transposed":
                logits = leaf(_empty(1031, 37, device="cuda", dtype=dtype).t())
            else:
                logits = leaf(torch.empty_strided((3, 5, 1031), (5 * 1040, 1040, 1), device="cuda", dtype=dtype))
            targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device="cuda")
            loss = ops.cross_entropy(logits, targets, backend=backend)
            none = ops.cross_entropy(logits.detach(), targets, reduction="none", backend=backend)
            return [loss, none]

        for layout in ("contiguous", "transposed", "sliced"):
            cases.append((f"cross_entropy {dtype} {layout}", lambda b, f=ce, l=layout: f(b, layout=l)))

        def lce(backend, dtype=dtype, transposed=False):
            hidden = leaf(_empty(29, 64, device="cuda", dtype=dtype))
            weight = (_empty(64, 517, device="cuda", dtype=dtype).t() if transposed
                      else _empty(517, 64, device="cuda", dtype=dtype))
            weight = leaf(weight)
            targets = torch.zeros(29, dtype=torch.long, device="cuda")
            return [ops.linear_cross_entropy(hidden, weight, targets, backend=backend)]

        cases.append((f"linear_cross_entropy {dtype}", lce))
        cases.append((f"linear_cross_entropy {dtype} transposed weight", lambda b, f=lce: f(b, transposed=True)))

        def attn(backend, dtype=dtype, layout="contiguous", tq=None, dropout=0.0):
            b, h, t, d = 2, 3, 37, 64
            # strides of (B, H, T, D) storage, or of (B, T, H, D) storage viewed as (B, H, T, D) as the
            # models' reshapes produce; a decode query is the last row of such a tensor
            strides = (h * t * d, t * d, d, 1) if layout == "contiguous" else (t * h * d, d, h * d, 1)
            k, v = (torch.empty_strided((b, h, t, d), strides, device="cuda", dtype=dtype) for _ in range(2))
            q = torch.empty_strided((b, h, tq or t, d), strides, device="cuda", dtype=dtype)
            if tq is None:  # a training step; a decode step (generation) records no graph
                q, k, v = leaf(q), leaf(k), leaf(v)
            return [ops.causal_attention(q, k, v, dropout_p=dropout, training=dropout > 0, backend=backend)]

        if dtype != torch.float32:  # the attention kernels are bf16/fp16 tensor-core kernels
            cases.append((f"causal_attention {dtype}", attn))
            cases.append((f"causal_attention {dtype} transposed", lambda b, f=attn: f(b, layout="transposed")))
            cases.append((f"causal_attention {dtype} dropout", lambda b, f=attn: f(b, dropout=0.1)))
            cases.append((f"causal_attention {dtype} decode", lambda b, f=attn: f(b, tq=1)))
            cases.append((f"causal_attention {dtype} decode transposed",
                          lambda b, f=attn: f(b, layout="transposed", tq=1)))

        def sample(backend, dtype=dtype, transposed=False):
            logits = (_empty(50, 5, device="cuda", dtype=dtype).t() if transposed
                      else _empty(5, 50, device="cuda", dtype=dtype))
            return [ops.sample_next_token(logits, temperature=0.8, top_k=7, backend=backend)]

        cases.append((f"sample_next_token {dtype}", sample))
        cases.append((f"sample_next_token {dtype} transposed", lambda b, f=sample: f(b, transposed=True)))
    return cases


def _needs_device(exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "AcceleratorError" in text or "NVIDIA driver" in text or "driver version is insufficient" in text


def check_fakes(ops: list[str]) -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    no_fake = [op for op in ops if not has_fake(op)]
    if no_fake:
        fail(f"no fake (meta) implementation for: {', '.join(no_fake)}")

    wanted = set(ops)
    calls: dict[str, int] = {op: 0 for op in ops}
    problems: list[str] = []

    class Record(TorchDispatchMode):
        """Checks every output of the extension's ops as it is produced."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name
            if func._overloadpacket._qualified_op_name in wanted or name in wanted:
                key = name if name in wanted else func._overloadpacket._qualified_op_name
                calls[key] += 1
                device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
                for i, o in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                    if not isinstance(o, torch.Tensor) or o.numel() == 0:
                        continue
                    if not o.is_contiguous():
                        problems.append(f"{key} output {i}: fake strides {o.stride()} for shape "
                                        f"{tuple(o.shape)} are not contiguous (the kernel allocates contiguous)")
                    if device is not None and o.device != device:
                        problems.append(f"{key} output {i}: on {o.device}, inputs on {device}")
            return out

    # Fake CUDA tensors need no device, but the autograd engine asks the driver for a stream as soon
    # as a graph is recorded on them.  So: no graph (no_grad), while the backends are told autograd
    # is on, so that forwards that save a gradient (cross-entropy's) still produce it.  Backward-only
    # ops are reached on a GPU only: the smoke run compares their fakes with the kernels there.
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # the H100/H200 the kernels target
    torch.is_grad_enabled = lambda: True
    import gptfast.ops as gops

    failures = 0
    needs_device: list[str] = []
    not_implemented: set[str] = set()
    cases = _cases(torch)
    with FakeTensorMode(allow_non_fake_inputs=False), torch.no_grad():
        for name, case in cases:
            try:
                with Record():
                    got = case("cuda")
                for i, g in enumerate(got):
                    if g.device.type != "cuda":
                        problems.append(f"{name}: public result {i} on {g.device}")
            except Exception as exc:  # noqa: BLE001
                if _needs_device(exc):  # e.g. a random draw from the CUDA generator
                    needs_device.append(name)
                    continue
                if "does not implement" in str(exc):  # the public op exists, this backend has no kernel
                    not_implemented.add(name.split()[0])
                    continue
                failures += 1
                problems.append(f"{name}: raised {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=3)
    unreached = [op for op, n in calls.items() if n == 0]
    if not any(calls.values()):
        problems.append("no extension op was reached through the public API")
    for problem in problems:
        print(f"check_cuda_extension: FAIL {problem}")
    if problems:
        sys.exit(1)
    print(f"check_cuda_extension: {len(cases)} fake-tensor cases through gptfast.ops (backend cuda): every "
          f"extension output contiguous and on the inputs' device; calls per op: "
          + ", ".join(f"{op.split('::')[-1]}={n}" for op, n in calls.items()))
    if not_implemented:
        print(f"check_cuda_extension: NOTE backend cuda does not implement {', '.join(sorted(not_implemented))}")
    if needs_device:
        print(f"check_cuda_extension: NOTE {len(needs_device)} cases need a real device even with fake tensors "
              f"(checked by the GPU smoke run): {', '.join(needs_device)}")
    if unreached:
        print(f"check_cuda_extension: NOTE reached only by autograd's backward, whose engine needs a device: "
              f"{', '.join(unreached)} (their fakes exist; the GPU smoke run compares them with the kernels)")
    del gops


def check_status() -> None:
    import gptfast.ops as ops

    status = ops.backend_status()["cuda"]
    if "no cuda device" not in status.lower():
        fail(f"backend_status()['cuda'] = {status!r}; expected it to say there is no CUDA device")
    print(f"check_cuda_extension: backend_status()['cuda'] = {status!r}")


def main() -> int:
    import torch

    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} has no CUDA: run this in the CUDA torch venv")
    ops = registered_ops()
    check_kernels(ops)
    check_status()  # before the fake-tensor pass fakes torch.cuda.is_available
    check_fakes(ops)
    print("check_cuda_extension: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
