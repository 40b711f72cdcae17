"""gptfast.ops: backend selection, error messages, input validation."""

import os
import subprocess
import sys

import pytest
import torch

from gptfast import ops
from gptfast.ops import _dispatch, torch_ops


def test_torch_backend_is_always_available_and_listed_first_of_the_fallbacks():
    names = ops.available_backends()
    assert "torch" in names and names[-1] == "torch"
    status = ops.backend_status()
    assert set(status) == {"cuda", "triton", "cpu", "torch"}
    assert status["torch"] == "available"


def test_use_backend_as_context_manager_restores_the_previous_choice():
    before = ops.get_backend()
    with ops.use_backend("torch") as chosen:
        assert chosen.name == "torch" and ops.get_backend() == "torch"
    assert ops.get_backend() == before


def test_use_backend_as_a_plain_call_sticks_until_changed():
    try:
        ops.use_backend("torch")
        assert ops.get_backend() == "torch"
    finally:
        ops.use_backend("auto")
    assert ops.get_backend() == "auto"


def test_a_kept_use_backend_object_selects_each_time_it_is_entered():
    keep = ops.use_backend("torch")
    try:
        ops.use_backend("auto")
        for _ in range(2):
            with keep:
                assert ops.get_backend() == "torch"
            assert ops.get_backend() == "auto"
    finally:
        ops.use_backend("auto")


def test_one_object_entered_twice_nested_or_by_two_threads_restores_each_block():
    import threading

    from gptfast.ops import _dispatch

    before = _dispatch._selection.get()
    keep = ops.use_backend("torch")
    with keep:
        with keep:
            assert ops.get_backend() == "torch"
        assert ops.get_backend() == "torch"
    assert _dispatch._selection.get() == before  # made and entered at once: as `with use_backend(...)`

    inside, release, seen = threading.Event(), threading.Event(), {}

    def holds_the_block():
        with keep:
            inside.set()
            release.wait()
        seen["first thread after"] = _dispatch._selection.get()

    def enters_meanwhile():
        inside.wait()
        with ops.use_backend("auto"):
            with keep:
                pass
            seen["second thread inside its own block"] = ops.get_backend()
        release.set()

    threads = [threading.Thread(target=holds_the_block), threading.Thread(target=enters_meanwhile)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"first thread after": None, "second thread inside its own block": "auto"}


def test_the_selection_belongs_to_its_thread_and_asyncio_task():
    import asyncio
    import threading

    seen = {}
    keep = ops.use_backend("torch")  # selects here, in the main thread
    try:
        def worker():
            seen["worker before"] = ops.get_backend()  # its own selection: none, so $GPTFAST_BACKEND or auto
            with keep:  # entered in another thread: selects there, and restores there
                seen["worker inside"] = ops.get_backend()
            seen["worker after"] = ops.get_backend()

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        default = os.environ.get("GPTFAST_BACKEND") or "auto"
        assert seen == {"worker before": default, "worker inside": "torch", "worker after": default}
        assert ops.get_backend() == "torch"
    finally:
        ops.use_backend("auto")

    async def selecting(started, release):
        with ops.use_backend("torch"):
            started.set()
            await release.wait()  # the other task runs while this one's block is open
        return ops.get_backend()

    async def other(started, release):
        await started.wait()
        backend = ops.get_backend()
        release.set()
        return backend

    async def both():
        started, release = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(selecting(started, release), other(started, release))

    assert asyncio.run(both()) == ["auto", "auto"]


def test_environment_variable_selects_the_backend():
    code = "import gptfast.ops as o; print(o.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "GPTFAST_BACKEND": "torch"}, check=True)
    assert out.stdout.strip() == "torch"


def test_importing_gptfast_loads_no_kernel_backend():
    # A process must be able to choose the build it loads (the portable-build check shadows the installed
    # extension after ``import gptfast``), and one that never uses the kernels should not pay for loading them.
    code = ("import sys, gptfast, gptfast.ch04, gptfast.ch05, gptfast.kv_cache.generate, gptfast.qwen3\n"
            "print(sorted(m for m in sys.modules if m.startswith('gptfast.') and m.endswith(('cpu_ops', 'cuda_ops', "
            "'triton_ops')) or m.startswith(('gptfast._C', 'gptfast.triton_kernels'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_gptfast_does_not_import_torch_dynamo():
    """The marks for torch.compile are set without loading the compiler (seconds, and many registered ops)."""
    code = ("import sys, gptfast, gptfast.ch04, gptfast.ch05, gptfast.kv_cache.generate, gptfast.qwen3, gptfast.ops\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout


def test_a_training_model_compiles_into_one_graph_before_any_kernel_backend_is_loaded():
    """Compiling is often a process's first use of the ops: loading a backend then happens while tracing."""
    code = ("import torch\n"
            "from gptfast.models import GPTModel, gpt2_config\n"
            "torch.manual_seed(0)\n"
            "model = GPTModel(gpt2_config('tiny', vocab_size=64, drop_rate=0.1)).train()\n"
            "out = torch.compile(model, backend='eager', fullgraph=True)(torch.randint(0, 64, (2, 8)))\n"
            "out.sum().backward()\n"
            "print(tuple(out.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "(2, 8, 64)", out.stderr[-2000:]


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.use_backend("fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_an_unavailable_backend_explains_why():
    with pytest.raises(RuntimeError, match="gptfast backend 'cuda' is not available: .+"):
        ops.use_backend("cuda")
    with pytest.raises(RuntimeError, match="cannot run cross_entropy"):
        ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


def test_auto_picks_a_backend_that_serves_the_device_and_falls_back_to_torch():
    x = torch.randn(2, 3)
    name = ops.selected_backend("cross_entropy", x)
    assert name in ops.available_backends()
    module = _dispatch._modules[name]
    assert "cpu" in module.DEVICES
    assert name == "torch" or "cross_entropy" in module.AUTO_OPS


def test_a_backend_refusing_a_call_makes_auto_fall_back(monkeypatch):
    class Refusing:
        DEVICES = ("cpu",)
        AUTO_OPS = frozenset({"cross_entropy"})

        @staticmethod
        def unavailable_reason():
            return None

        @staticmethod
        def supports(op, *args, **kwargs):
            return "refuses everything"

        @staticmethod
        def cross_entropy(*args, **kwargs):
            raise AssertionError("must not be called")

    monkeypatch.setitem(_dispatch._modules, "cpu", Refusing)
    monkeypatch.delitem(_dispatch._import_errors, "cpu", raising=False)
    logits, targets = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert ops.selected_backend("cross_entropy", logits) == "torch"
    torch.testing.assert_close(ops.cross_entropy(logits, targets), torch.nn.functional.cross_entropy(logits, targets))
    with pytest.raises(RuntimeError, match="refuses everything"):
        ops.cross_entropy(logits, targets, backend="cpu")


# ----------------------------------------------------------------------------- validation


def _qkv(b=1, h=2, tq=4, tk=4, d=8, **kw):
    return torch.randn(b, h, tq, d, **kw), torch.randn(b, h, tk, d, **kw), torch.randn(b, h, tk, d, **kw)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :3], v), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[..., :4], v[..., :4]), ValueError, "agree in batch and head_dim"),
    (lambda q, k, v: (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)), ValueError,
     "agree in batch and head_dim"),
    # k/v with fewer heads is grouped-query attention; the heads must divide q's
    (lambda q, k, v: (q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)), ValueError,
     "multiple of the key/value heads"),
    (lambda q, k, v: (torch.randn(1, 2, 5, 8), k, v), ValueError, "Tq <= Tk"),
    (lambda q, k, v: (q.long(), k, v), TypeError, "q must be a floating tensor"),
    (lambda q, k, v: (q.double(), k, v), TypeError, "share one dtype"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q.to("meta"), k, v), ValueError, "one device"),
])
def test_attention_rejects_bad_input(mutate, error, match):
    with pytest.raises(error, match=match):
        ops.causal_attention(*mutate(*_qkv()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dropout_p=1.5), "dropout_p"), (dict(dropout_p=-0.1), "dropout_p"), (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
])
def test_attention_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.causal_attention(*_qkv(), **kwargs)


def test_attention_decode_case_matches_full_attention_last_rows():
    q, k, v = _qkv(tq=7, tk=7)
    full = ops.causal_attention(q, k, v, backend="torch")
    last = ops.causal_attention(q[:, :, -2:], k, v, backend="torch")
    torch.testing.assert_close(last, full[:, :, -2:])


@pytest.mark.parametrize("logits,targets,error,match", [
    (torch.randn(4), torch.zeros(4, dtype=torch.long), ValueError, "logits must be"),
    (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), ValueError, "targets must have shape"),
    (torch.randn(4, 5), torch.zeros(4), TypeError, "targets must be an int64"),
    (torch.randn(4, 5).long(), torch.zeros(4, dtype=torch.long), TypeError, "logits must be a floating"),
    (torch.randn(4, 5), torch.tensor([0, 1, 5, 2]), ValueError, "targets contains 5"),
    (torch.randn(4, 5), torch.tensor([0, -3, 1, 2]), ValueError, "targets contains -3"),
])
def test_cross_entropy_rejects_bad_input(logits, targets, error, match):
    with pytest.raises(error, match=match):
        ops.cross_entropy(logits, targets)


def test_an_out_of_range_target_is_also_the_index_error_torch_raises():
    import torch.nn.functional as F
    logits, targets = torch.randn(3, 2), torch.tensor([0, 2, 1])
    with pytest.raises(IndexError):
        F.cross_entropy(logits, targets)  # the reference's loss
    with pytest.raises(IndexError, match="targets contains 2"):
        ops.cross_entropy(logits, targets)
    with pytest.raises(IndexError, match="targets contains -1"):
        ops.linear_cross_entropy(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, -1, 1]))


def test_cross_entropy_rejects_bad_reduction_and_accepts_3d_and_int32():
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, targets, reduction="avg")
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(ops.cross_entropy(logits, targets.int(), reduction="none"), expected.view(2, 3))


def test_linear_cross_entropy_matches_linear_then_cross_entropy_and_checks_shapes():
    hidden, weight, bias = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randn(11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = -100
    expected = torch.nn.functional.cross_entropy((hidden @ weight.T + bias).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets, bias=bias), expected)
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(hidden, torch.randn(11, 7), targets)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear_cross_entropy(hidden, weight, targets, bias=torch.randn(3))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(top_k=0), ValueError, "top_k must be in"),
    (dict(top_k=51), ValueError, "top_k must be in"),
    (dict(top_k=2.5), TypeError, "top_k must be"),
    (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
    (dict(temperature="hot"), TypeError, "temperature must be"),
    (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature must be >= 0 in every row"),
    (dict(top_k=torch.tensor([1, 60])), ValueError, "top_k must be in"),
    (dict(top_k=torch.tensor([1, 2, 3])), ValueError, "one value per row"),
    (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "int64 or int32"),
    (dict(generator="seed"), TypeError, "generator"),
])
def test_sampling_rejects_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.sample_next_token(torch.randn(2, 50), **kwargs)


def test_sampling_rejects_bad_logits():
    with pytest.raises(ValueError, match="logits must be"):
        ops.sample_next_token(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating"):
        ops.sample_next_token(torch.zeros(2, 4, dtype=torch.long))


def test_per_row_sampling_parameters_on_the_oracle():
    logits = torch.randn(3, 40)
    temperature = torch.tensor([0.0, 1.0, 0.0])
    top_k = torch.tensor([1, 3, 40])
    gen = torch.Generator().manual_seed(0)
    out = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, generator=gen, backend="torch")
    argmax = logits.argmax(-1)
    assert out[0, 0] == argmax[0] and out[2, 0] == argmax[2]
    assert out[1, 0] in torch.topk(logits[1], 3).indices


def test_top_k_keeps_ties_at_the_kth_value_like_the_reference():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    kept = torch_ops._keep_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[True, True, True, True, False]]


def test_model_runs_under_torch_compile():
    from gptfast.models import TINY_CONFIG
    from gptfast.models import GPTModel

    torch.manual_seed(0)
    model = GPTModel(TINY_CONFIG).eval()
    idx = torch.randint(0, 50257, (2, 12))
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the backends


def test_cpu_backend_is_listed():
    from gptfast.ops import cpu_ops
    if cpu_ops.unavailable_reason() is not None:
        pytest.skip(cpu_ops.unavailable_reason())
    assert "cpu" in ops.available_backends()
    assert cpu_ops.DEVICES == ("cpu",)
    assert cpu_ops.AUTO_OPS == frozenset({"causal_attention", "cross_entropy", "linear_cross_entropy",
                                          "sample_next_token", "rms_norm", "layer_norm", "gelu", "dropout",
                                          "rope", "decode_linear", "swiglu"})


def test_cuda_unavailable_reason_names_the_cause():
    from gptfast.ops import cuda_ops
    reason = cuda_ops.unavailable_reason()
    if cuda_ops._LOAD_ERROR is not None:
        from gptfast import _build_info
        why = _build_info.why_not_built("cuda")  # setup.py's recorded reason, when it left the extension out
        if why:
            assert f"gptfast._C_cuda is unavailable: {why}" in reason
        else:
            assert "built without CUDA" in reason and "nvcc" in reason
    elif not torch.cuda.is_available():
        assert reason == "no CUDA device is available (torch.cuda.is_available() is False)"
    else:
        assert reason is None
    assert ops.backend_status()["cuda"] == (reason or "available")
    assert ("cuda" in ops.available_backends()) == (reason is None)


def test_use_backend_cuda_raises_with_the_reason():
    from gptfast.ops import cuda_ops
    reason = cuda_ops.unavailable_reason()
    if reason is None:
        pytest.skip("the backend is available here")
    with pytest.raises(RuntimeError, match="gptfast backend 'cuda' is not available: ") as info:
        ops.use_backend("cuda")
    assert reason in str(info.value)
    with pytest.raises(RuntimeError, match="cannot run sample_next_token"):
        ops.sample_next_token(torch.randn(2, 5), backend="cuda")


def test_auto_never_picks_cuda_or_triton_for_cpu_tensors_nor_unmeasured_kernels():
    from gptfast.ops import cuda_ops, triton_ops
    x = torch.randn(3, 7)
    assert ops.selected_backend("cross_entropy", x, torch.tensor([0, 1, 2])) not in ("cuda", "triton")
    assert ops.selected_backend("sample_next_token", x) not in ("cuda", "triton")
    assert ops.selected_backend("causal_attention", torch.randn(2, 2, 4, 16)) not in ("cuda", "triton")
    # AUTO_OPS holds only ops measured faster than torch; no GPU has measured these yet.
    assert cuda_ops.AUTO_OPS == frozenset() and triton_ops.AUTO_OPS == frozenset()


def test_triton_backend_is_available_and_registered():
    pytest.importorskip("triton")
    from gptfast.ops import triton_ops
    if not triton_ops.INTERPRETER and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    assert ops.unavailable_reason("triton") is None
    assert "triton" in ops.available_backends()


# The schemas of csrc/schemas.h: every namespace that registers an op registers exactly this.
SCHEMAS = {
    "attention_fwd": "(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    "attention_bwd": ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
                      "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)"),
    "cross_entropy_fwd": "(Tensor logits, Tensor targets, int ignore_index, bool want_grad) -> (Tensor, Tensor)",
    "sample_next_token": ("(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
                          "int top_k_value, Generator? generator) -> Tensor"),
    "rms_norm_fwd": "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
    "layer_norm_fwd": "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_bwd": "(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)",
    "swiglu_fwd": "(Tensor gate, Tensor up) -> Tensor",
    "swiglu_bwd": "(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)",
    "gelu_fwd": "(Tensor x) -> Tensor",
    "gelu_bwd": "(Tensor grad_out, Tensor x) -> Tensor",
    "dropout_fwd": "(Tensor x, float p, Tensor seed) -> Tensor",
    "rope_fwd": "(Tensor x, Tensor cos, Tensor sin, Tensor? positions, int offset) -> Tensor",
    "rope_bwd": "(Tensor grad_out, Tensor cos, Tensor sin, Tensor? positions, int offset) -> Tensor",
    "decode_linear": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
}


def _op_signature(schema) -> str:
    text = str(schema)
    # triton_op infers Python ints as SymInt (an int that may also be symbolic): the same call.
    return text[text.index("("):].replace("SymInt ", "int ")


def test_one_schema_per_op_in_every_namespace():
    import pathlib
    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "schemas.h").read_text()
    compact = "".join(part.strip().strip('"') for part in header.splitlines())
    for name, signature in SCHEMAS.items():
        assert f"{name}{signature}" in compact.replace('"', ""), f"csrc/schemas.h lost {name}{signature}"
    checked = []
    for backend in ("cpu", "triton", "cuda"):
        if ops.unavailable_reason(backend) is not None:
            continue
        namespace = getattr(torch.ops, f"gptfast_{backend}")
        for name, signature in SCHEMAS.items():
            assert _op_signature(getattr(namespace, name).default._schema) == signature, (backend, name)
        checked.append(backend)
    assert checked or ops.available_backends() == ["torch"]


def test_triton_kernel_package_imports_nothing_from_gptfast():
    import pathlib
    import re
    for path in (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "triton").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", path.read_text(), flags=re.M)
        assert not [m for m in imports if m.startswith("gptfast")], f"{path.name} imports {imports}"


def test_gpt_model_forward_backward_on_the_cpu_backend_matches_torch():
    from gptfast.models import gpt2_config
    from gptfast.models import GPTModel
    from gptfast.ops import cpu_ops
    if cpu_ops.unavailable_reason() is not None:
        pytest.skip(cpu_ops.unavailable_reason())
    torch.manual_seed(20)
    model = GPTModel(gpt2_config("tiny", vocab_size=500)).eval()
    idx = torch.randint(0, 500, (2, 23))
    targets = torch.randint(0, 500, (2, 23))

    def step(backend):
        model.zero_grad()
        with ops.use_backend(backend):
            logits = model(idx)
            loss = ops.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_c, loss_c, grads_c = step("cpu")
    logits_t, loss_t, grads_t = step("torch")
    torch.testing.assert_close(logits_c, logits_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_c, loss_t, atol=1e-5, rtol=1e-5)
    for name in grads_t:
        torch.testing.assert_close(grads_c[name], grads_t[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_an_extension_older_than_the_package_is_refused_with_the_ops_it_lacks():
    from gptfast.ops import _dispatch
    reason = _dispatch.stale_extension_reason("gptfast_never_built")
    assert reason is not None and "rope_bwd" in reason and "rebuild" in reason
    assert set(_dispatch.KERNEL_OPS) == {name for name in SCHEMAS}
    for backend in ("cpu", "cuda"):
        if ops.unavailable_reason(backend) is None:
            assert _dispatch.stale_extension_reason(f"gptfast_{backend}") is None
    own = ("cross_entropy_fwd_inplace",)  # the cpu namespace's own op
    assert "decode_linear" in _dispatch.stale_extension_reason("gptfast_never_built")  # every namespace has it
    assert "cross_entropy_fwd_inplace" in _dispatch.stale_extension_reason("gptfast_never_built", own_ops=own)
    if ops.unavailable_reason("cpu") is None:
        assert _dispatch.stale_extension_reason("gptfast_cpu", own_ops=own) is None


def _autograd_layer_calls(fn):
    """Names of the functions of torch's Python autograd layer for custom ops that ``fn()`` enters."""
    entered = []

    def profiler(frame, event, _arg):
        path = frame.f_code.co_filename.replace("\\", "/")
        if event == "call" and path.endswith("torch/_library/autograd.py"):
            entered.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_calls_without_grad_skip_the_python_autograd_layer(backend):
    if ops.unavailable_reason(backend) is not None:
        pytest.skip(ops.unavailable_reason(backend))
    x = torch.randn(3, 8, requires_grad=True)
    weight, bias = torch.randn(8, requires_grad=True), torch.randn(8)
    with ops.use_backend(backend):
        assert _autograd_layer_calls(lambda: ops.layer_norm(x, weight, bias))  # a graph is recorded through it
        with torch.no_grad():
            assert _autograd_layer_calls(lambda: ops.layer_norm(x, weight, bias)) == []
            out = ops.layer_norm(x, weight, bias)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, ops.layer_norm(x, weight, bias).detach())


def test_selected_backend_names_an_unknown_op_and_asks_for_the_arguments_it_needs():
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="op must be one of .*not_an_op"):
        ops.selected_backend("not_an_op", x)
    with pytest.raises(TypeError, match="tensor arguments"):
        ops.selected_backend("rope")
    with ops.use_backend("cpu" if "cpu" in ops.available_backends() else "torch"):
        cos = sin = torch.randn(4, 8)
        assert ops.selected_backend("rope", x, cos, sin) in ("cpu", "torch")
        if ops.get_backend() == "cpu":  # its limits read the tables: a clear TypeError, not theirs
            with pytest.raises(TypeError, match=r"selected_backend\('rope', \.\.\.\) needs more of rope's"):
                ops.selected_backend("rope", x)
