"""Backend registry and selection for the fused ops.

A backend is a thin loader module: it loads its kernels (a C++ extension or the
Triton kernel package) and exposes one function per op it implements, bound to the
op modules (``attention``, ``loss``, ``sampling``, ...) that hold everything above
the kernels.  Modules are imported lazily, the first time a backend is considered, so
importing gptfast never builds or loads a kernel.

Contract for a backend module (see ``torch_ops.py`` for the oracle):

``unavailable_reason() -> str | None``
    ``None`` when usable on this machine, else a sentence saying why not
    (extension not built, no CUDA device, triton missing ...).
``DEVICES: tuple[str, ...]``
    device types it serves (``"cpu"``, ``"cuda"``).
``AUTO_OPS: frozenset[str]``
    ops that ``"auto"`` may pick this backend for (only those measured faster
    than the torch path on those devices).
``<op>(...)``
    one function per implemented op, same keyword names as ``gptfast.ops``.
``supports(op, *tensors, **kwargs) -> str | None`` (optional)
    ``None`` when this call can be served, else the reason (e.g. head dim 96).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._functorch import pyfunctorch as _pyfunctorch
from torch.utils import _python_dispatch

from . import _checks

OPS = ("causal_attention", "cross_entropy", "linear_cross_entropy", "sample_next_token", "rms_norm", "layer_norm",
       "swiglu", "gelu", "dropout", "rope", "decode_linear")


# The kernel ops every C++ namespace defines (csrc/schemas.h); a built extension that lacks one is
# older than its Python layer and must be rebuilt.
KERNEL_OPS = ("attention_fwd", "attention_bwd", "cross_entropy_fwd", "sample_next_token", "rms_norm_fwd",
              "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd", "swiglu_fwd", "swiglu_bwd", "gelu_fwd", "gelu_bwd",
              "dropout_fwd", "rope_fwd", "rope_bwd", "decode_linear")


def stale_extension_reason(namespace: str, own_ops: tuple[str, ...] = ()) -> str | None:
    """Why the loaded extension of ``namespace`` cannot serve this package (it lacks ops), else ``None``.

    ``own_ops``: kernel ops only this namespace defines (csrc/schemas.h lists them per backend).
    """
    missing = [name for name in KERNEL_OPS + own_ops if not hasattr(getattr(torch.ops, namespace), name)]
    if missing:
        return (f"the built extension is older than this package (torch.ops.{namespace} lacks "
                f"{', '.join(missing)}): rebuild with pip install --no-build-isolation -e .")
    return None


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    description: str


# Order matters: "auto" tries backends in this order for each op.
BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("cuda", "gptfast.ops.cuda_ops", "hand-written CUDA C++ kernels (csrc/cuda)"),
        BackendSpec("triton", "gptfast.ops.triton_ops", "Triton kernels (csrc/triton)"),
        BackendSpec("cpu", "gptfast.ops.cpu_ops", "C++ CPU kernels (csrc/cpu)"),
        BackendSpec("torch", "gptfast.ops.torch_ops", "plain PyTorch, the reference oracle"),
    )
}
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)

_modules: dict[str, ModuleType] = {}
_import_errors: dict[str, str] = {}
# The selection of use_backend: a context variable, so it holds for the thread (and asyncio task) that made it and
# the tasks that task starts, and a `with` block around an `await` does not reach other tasks.
_selection: contextvars.ContextVar[str | None] = contextvars.ContextVar("gptfast_backend", default=None)
# The `with use_backend(...)` blocks open in this context, innermost last: (object, token of its selection, whether
# its exit also undoes the selection its construction made).  Per context, so threads and tasks sharing one object
# each restore their own selection.
_open_blocks: contextvars.ContextVar[tuple] = contextvars.ContextVar("gptfast_backend_blocks", default=())


def _load(name: str) -> ModuleType | None:
    """Import a backend module once; remember why it failed if it did."""
    if name in _modules:
        return _modules[name]
    if name in _import_errors:
        return None
    try:
        module = importlib.import_module(BACKENDS[name].module)
    except ImportError as exc:  # not written yet, or a dependency is missing
        _import_errors[name] = f"could not import {BACKENDS[name].module}: {exc}"
        return None
    _modules[name] = module
    return module


# Per op, ``fn(*args, **kwargs) -> reason | None`` for calls no fused backend can serve (the op module's own
# limits); filled by :func:`register_kernels`, which every fused backend runs when it loads.
_FUSED_LIMITS: dict = {}


def register_fake(op_name: str, fake) -> None:
    """``torch.library.register_fake(op_name)(fake)``, with a call that mixes meta tensors and real ones refused.

    The Meta key wins the dispatch of such a call, so it reaches the fake instead of the kernel and its checks: the
    fake would hand back an unwritten tensor on the real tensors' device.  (Under FakeTensorMode every tensor reports
    the device it stands for, so traced calls never mix.)
    """

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if len({t.device.type == "meta" for t in tensors}) > 1:
            devices = ", ".join(sorted({str(t.device) for t in tensors}))
            raise RuntimeError(f"{op_name}: the tensor arguments must all be on one device, got {devices}")
        return fake(*args, **kwargs)

    torch.library.register_fake(op_name)(checked)


def register_kernels(namespace: str, *, fakes_in_bodies: bool = False) -> None:
    """Register the fakes and autograd of every op in a kernel namespace (the op modules hold them).

    ``fakes_in_bodies``: the attention and cross-entropy ops are ``triton_op``s, whose fake
    is their own Python body.
    """
    from . import activation, attention, linear, loss, normalization, regularization, rotary, sampling

    attention.register(namespace, fakes=not fakes_in_bodies)
    loss.register(namespace, fakes=not fakes_in_bodies)
    sampling.register(namespace)
    normalization.register(namespace, fakes=not fakes_in_bodies)
    activation.register(namespace, fakes=not fakes_in_bodies)
    regularization.register(namespace, fakes=not fakes_in_bodies)
    rotary.register(namespace, fakes=not fakes_in_bodies)
    linear.register(namespace, fakes=not fakes_in_bodies)
    _FUSED_LIMITS["rope"] = rotary.fused_rope_limit


def kernels(ops):
    """``torch.ops.<ops>`` for a namespace name (``"gptfast_cpu"``); any other object (a test's stand-in) as is."""
    return getattr(torch.ops, ops) if isinstance(ops, str) else ops


def without_graph():
    """The context of a forward kernel call: with grad mode off, the call goes straight to the kernel.

    The kernels' autograd is registered from Python, so each call passes through a Python
    function even under ``no_grad`` (~7 µs on a 2-core CPU, as long as a decode step's
    small kernels run); with grad off it only forwards the call.  Under ``torch.compile``
    the call keeps its normal path (the guard is not traceable).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


# Kernel namespace -> the extension module whose ``direct_<kernel>`` functions call its forward kernels without
# the dispatcher (the CPU extension registers itself; see csrc/cpu/registration.cpp).
_DIRECT_CALLS: dict[str, object] = {}


def register_direct_calls(namespace: str, module) -> None:
    """Offer ``module``'s ``direct_<kernel>`` functions for ``namespace``'s guarded bound kernels."""
    _DIRECT_CALLS[namespace] = module


def direct_call(namespace, kernel: str):
    """The dispatcher-free function for ``kernel`` of ``namespace``, or ``None`` where there is none."""
    module = _DIRECT_CALLS.get(namespace) if isinstance(namespace, str) else None
    return getattr(module, f"direct_{kernel}", None)


def bound_kernel(entry_point, fused, kernel: str, *, first_output: bool = False, guarded: bool = False):
    """A function calling kernel op ``kernel`` behind ``entry_point`` directly, or ``None``.

    ``entry_point`` is what :func:`resolve` returned; it is a fused backend's when it is the
    op module's ``fused`` function bound to a kernel namespace (:func:`fused_entry_points`).
    The function takes the kernel's own arguments and runs it as :func:`without_graph` does;
    with ``first_output`` it returns only the first of the kernel's outputs (a norm's saved
    statistics dropped).  An op module uses this to give a caller that has prepared its
    inputs in the kernel's layout once (a decode plan) the kernel without the per-call
    reshaping, which at one row costs as much as the kernel's work on a small matrix.
    With ``guarded`` the caller runs the function inside :func:`without_graph` itself, with grad
    mode off, on plain tensors of the kernel's device (a decode plan enters it once per step):
    the kernel is then called without the dispatcher where its extension offers that
    (:func:`register_direct_calls`; ~0.4 µs a call where the op costs ~6 µs below autograd),
    else as the op.
    """
    if not (isinstance(entry_point, functools.partial) and entry_point.func is fused and len(entry_point.args) == 1
            and not entry_point.keywords):
        return None
    namespace = entry_point.args[0]
    overload = getattr(kernels(namespace), kernel).default
    if guarded:
        call = direct_call(namespace, kernel) or overload
        return (lambda *args: call(*args)[0]) if first_output else call

    def call(*args):
        with without_graph():
            out = overload(*args)
        return out[0] if first_output else out

    return call


def fused_entry_points(namespace: str, **overrides) -> dict:
    """Every op's entry point bound to ``namespace``'s kernels: the table each kernel backend exposes.

    The op modules hold the entry points (``fused_<op>(namespace, ...)``); ``overrides``
    replaces one for a backend whose layer differs (the CUDA attention's head-dim padding).
    A backend module puts the result in its namespace, so ``getattr(backend, op)`` finds it.
    """
    from . import activation, attention, linear, loss, normalization, regularization, rotary, sampling

    table = {
        "causal_attention": attention.fused_causal_attention, "cross_entropy": loss.fused_cross_entropy,
        "linear_cross_entropy": loss.fused_linear_cross_entropy, "sample_next_token": sampling.fused_sample_next_token,
        "rms_norm": normalization.fused_rms_norm, "layer_norm": normalization.fused_layer_norm,
        "swiglu": activation.fused_swiglu, "gelu": activation.fused_gelu, "dropout": regularization.fused_dropout,
        "rope": rotary.fused_rope,
        "decode_linear": linear.fused_decode_linear,
    }
    table.update(overrides)
    return {op: functools.partial(fn, namespace) for op, fn in table.items()}


def constant_under_compile(fn):
    """``fn`` marked as ``torch.compiler.assume_constant_result`` marks it (``torch.compile`` calls it eagerly
    while tracing and keeps its result as a constant), without importing ``torch._dynamo`` now: that import
    takes seconds and registers many ops, and a program that never compiles should not pay for it.  The mark
    is the attribute that decorator sets."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def _selected() -> str | None:
    """use_backend's selection here, or None.  A constant of the trace under torch.compile (dynamo cannot trace a
    context variable's read), as the choice of kernels is."""
    return _selection.get()


@constant_under_compile
def _import_every_backend() -> int:
    """Import every backend module (once; later calls find them imported) and return how many loaded.

    ``torch.compile`` runs this eagerly while tracing, as a constant of the graph: an import cannot be
    traced, and a compiled model is often a process's first user of the ops.  Importing all of them
    before :func:`resolve` reads the module table keeps the traced table whole.
    """
    for name in BACKENDS:
        _load(name)
    return len(_modules)


def unavailable_reason(name: str) -> str | None:
    """``None`` if backend ``name`` can run here, else why it cannot."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    module = _load(name)
    if module is None:
        return _import_errors[name]
    return module.unavailable_reason()


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in ``"auto"`` priority order."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def backend_status() -> dict[str, str]:
    """Each backend's name mapped to ``"available"`` or the reason it is not."""
    return {name: unavailable_reason(name) or "available" for name in BACKENDS}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend now selected: ``use_backend``'s choice, else ``$GPTFAST_BACKEND``, else ``"auto"``."""
    chosen = _selected()
    if chosen is None:
        chosen = _check_name(os.environ.get("GPTFAST_BACKEND", "auto") or "auto")
    return chosen


def check_backend_choice(name: str | None = None) -> str:
    """A command's backend choice, checked before anything is read or built: ``name`` (its ``--backend``), else
    ``use_backend``'s selection, else ``$GPTFAST_BACKEND``, else ``"auto"``.

    A name that is no backend is a ``ValueError`` naming where it came from; a named backend that
    cannot run here is a ``RuntimeError``, as ``use_backend`` raises.  Selects nothing.
    """
    source = "backend"
    if name is None:
        name = _selected()
        if name is None:
            name, source = os.environ.get("GPTFAST_BACKEND", "auto") or "auto", "GPTFAST_BACKEND"
    if not isinstance(name, str) or name not in BACKEND_CHOICES:
        raise ValueError(f"{source} must be one of {BACKEND_CHOICES}, got {name!r}")
    reason = None if name == "auto" else unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"gptfast backend {name!r} ({source}) is not available: {reason}")
    return name


class use_backend:
    """Select the backend for the gptfast ops.

    Works both as a plain call, which changes the selection until changed again,
    and as a context manager, which restores the previous selection on exit::

        gptfast.ops.use_backend("cpu")
        with gptfast.ops.use_backend("torch"):
            ...

    The selection holds in the thread (or asyncio task) that makes it and in the asyncio tasks it then starts;
    other threads keep their own (``$GPTFAST_BACKEND`` selects for every thread).  One object may be entered
    again, in any thread: each ``with`` selects its backend on entry and restores on exit.  A named backend
    that cannot run here raises ``RuntimeError`` at once.
    """

    def __init__(self, name: str):
        _check_name(name)
        if name != "auto":
            reason = unavailable_reason(name)
            if reason is not None:
                raise RuntimeError(f"gptfast backend {name!r} is not available: {reason}")
        self.name = name
        self._made = _selection.set(name)  # the plain call's selection
        self._fresh = True

    def __enter__(self) -> "use_backend":
        # Entered right after it was made (`with use_backend(...)`): the exit undoes the construction's selection
        # too, restoring what was selected before the call.
        undo_made = self._fresh and _selection.get() == self.name
        self._fresh = False
        _open_blocks.set(_open_blocks.get() + ((self, _selection.set(self.name), undo_made),))
        return self

    def __exit__(self, *exc_info) -> None:
        blocks = _open_blocks.get()
        i = max(k for k, block in enumerate(blocks) if block[0] is self)  # this object's innermost block here
        _, token, undo_made = blocks[i]
        _open_blocks.set(blocks[:i] + blocks[i + 1:])
        _selection.reset(token)
        if undo_made:
            with contextlib.suppress(ValueError):  # made in another context: nothing of it to undo in this one
                _selection.reset(self._made)


def _serves(module: ModuleType, op: str, device: torch.device, args, kwargs) -> str | None:
    """``None`` if ``module`` can run ``op`` for these inputs, else why not."""
    if device.type not in module.DEVICES:
        return f"it runs on {'/'.join(module.DEVICES)} tensors, not {device.type}"
    if not hasattr(module, op):
        return f"it does not implement {op}"
    supports = getattr(module, "supports", None)
    return supports(op, *args, **kwargs) if supports is not None else None


def _serves_fused(module: ModuleType, op: str, device: torch.device, args, kwargs) -> str | None:
    """:func:`_serves` for a fused (kernel) backend: also the op's own limits on fused kernels, and forward-mode AD."""
    reason = _serves(module, op, device, args, kwargs)
    limit = _FUSED_LIMITS.get(op)
    if reason is None and limit is not None and args:
        reason = limit(*args, **kwargs)
    return reason or forward_mode_reason(args, kwargs)


def forward_mode_reason(args=(), kwargs=None) -> str | None:
    """Why no fused kernel can take a call under forward-mode AD, or None outside it.

    The kernels have reverse-mode formulas only: a tangent (``torch.func.jvp``, or a dual tensor of
    ``torch.autograd.forward_ad``) would be dropped without an error, its output's tangent zero.  Both tests are
    cheap outside forward-mode AD: no dual level open, no functorch transform on the stack.
    """
    if torch.compiler.is_compiling():  # traced graphs take no tangents here; the stack walk would break the graph
        return None
    if _forward_ad._current_level >= 0:
        tensors = (t for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor))
        if any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            return "an input carries a forward-mode tangent (torch.autograd.forward_ad): the fused kernels have no " \
                   "forward derivative"
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
            interpreter.key() == torch._C._functorch.TransformType.Jvp
            for interpreter in _pyfunctorch.retrieve_all_functorch_interpreters()):
        return "inside torch.func.jvp: the fused kernels have no forward derivative"
    return None


def fused_entry_point(op: str, device: torch.device, args=(), kwargs=None):
    """The entry point :func:`resolve` picks for ``op`` with the selected backend, or ``None`` when that is the
    torch path or a named backend cannot serve the call (the caller then computes the plain way)."""
    try:
        name, fn = resolve(op, device, args, kwargs)
    except RuntimeError:
        return None
    return None if name == "torch" else fn


def resolve(op: str, device: torch.device, args=(), kwargs=None, backend: str | None = None):
    """Return ``(backend_name, function)`` that will run ``op`` on ``device``."""
    _import_every_backend()
    kwargs = kwargs or {}
    name = _check_name(backend) if backend is not None else get_backend()
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is None:
            serves = _serves if name == "torch" else _serves_fused
            reason = serves(_modules[name], op, device, args, kwargs)
        if reason is not None:
            raise RuntimeError(f"gptfast backend {name!r} cannot run {op}: {reason}")
        return name, getattr(_modules[name], op)
    for candidate in BACKENDS:
        if candidate != "torch" and unavailable_reason(candidate) is None:
            module = _modules[candidate]
            if op in module.AUTO_OPS and _serves_fused(module, op, device, args, kwargs) is None:
                return candidate, getattr(module, op)
    return "torch", getattr(_load("torch"), op)


def autocast_inputs(*tensors):
    """``tensors`` as autocast hands them to a matrix product: floating ones (float64 is left alone) in the
    autocast dtype while autocast is on for their device, the others (and ``None``) as they are.  The fused
    kernels are one op each, which autocast does not cast; the torch path's products are cast by autocast
    itself, so it takes the tensors as given."""
    first = next((t for t in tensors if t is not None), None)
    if first is None or not _checks.autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


# What eager code holds: tensors and parameters (tracers' fake, functional and proxy tensors are other subclasses).
_EAGER_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_tracing(t: torch.Tensor) -> bool:
    """True while dynamo/AOTAutograd/make_fx/opcheck trace (fake, functional or proxy tensors) or a ``torch.func``
    transform wraps ``t``; False when eager."""
    return (torch.compiler.is_compiling() or type(t) not in _EAGER_TENSOR_TYPES
            or _python_dispatch._get_current_dispatch_mode() is not None
            or torch._C._functorch.is_functorch_wrapped_tensor(t))
