"""The planned CPU decode steps (book GPT, Llama 3 / Qwen3) against the generic cached step and the models.

The plan (``gptfast.generation.planned``) replaces only the walk over the model's modules:
its logits must be bitwise those of the generic step, which calls the same kernels through
the modules; a model it cannot vouch for (hooks, active dropout, other modules, backend
``"torch"``) must keep the generic step.
"""

import contextlib
import functools

import pytest
import torch

import llms_from_scratch.ch04 as ref_ch04
import llms_from_scratch.qwen3 as ref_qwen3

from gptfast import ops
from gptfast.generation import CachedRunner, KVCache, generate
from gptfast.generation import planned
from gptfast.generation.runner import DECODE_LINEAR_MAX_ROWS
from gptfast.models import GPTModel, layers
from gptfast.models import llama3, llama3_cached, qwen3, qwen3_batched, qwen3_cached
from gptfast.models.gpt import FeedForwardFast
from gptfast.ops import _dispatch
from gptfast.ops.activation import fused_gelu, gelu_rows, swiglu_rows
from gptfast.ops.linear import decode_linear_rows, fused_decode_linear
from gptfast.ops.normalization import fused_layer_norm, layer_norm_rows
from test_models_cached import llama_cfg, qwen_cfg

needs_cpu_backend = pytest.mark.skipif(ops.unavailable_reason("cpu") is not None,
                                       reason="the CPU extension is not built here")

CFG = {"vocab_size": 97, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 3, "drop_rate": 0.0,
       "qkv_bias": True}


def make_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**CFG, **overrides}).eval().to(dtype)


def _steps(model, idx, n_steps, plan):
    """Prefill ``idx``, then ``n_steps`` greedy decode steps; each step's logits.  ``plan=False`` keeps the
    generic walk (the runner finds no plan)."""
    runner = CachedRunner(model)
    if not plan:
        runner._plan = lambda tokens: None
    cache = KVCache.for_model(model, idx.shape[0], idx.shape[1] + n_steps)
    logits = [runner.prefill(idx, cache)]
    position = idx.shape[1]
    for _ in range(n_steps):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(runner.decode(token, cache, position))
        position += 1
    return logits, runner


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch", [1, 3, DECODE_LINEAR_MAX_ROWS])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "nobias"])
def test_planned_steps_are_bitwise_the_generic_steps(dtype, batch, qkv_bias):
    model = make_model(dtype=dtype, qkv_bias=qkv_bias)
    idx = torch.randint(0, CFG["vocab_size"], (batch, 5), generator=torch.Generator().manual_seed(batch))
    with ops.use_backend("auto"):
        planned_logits, runner = _steps(model, idx, 6, plan=True)
        generic_logits, _ = _steps(model, idx, 6, plan=False)
    assert [key for key, plan in runner._plans.items() if plan is not None] == [((batch, 1), "auto")]
    for ours, theirs in zip(planned_logits, generic_logits):
        assert ours.shape == (batch, CFG["vocab_size"]) and ours.dtype == dtype
        assert torch.equal(ours, theirs)


@needs_cpu_backend
def test_float64_steps_plan_or_not_are_the_generic_steps():
    model = make_model(dtype=torch.float64)  # no float64 decode kernel: F.linear inside the plan too
    idx = torch.randint(0, CFG["vocab_size"], (2, 3), generator=torch.Generator().manual_seed(6))
    for ours, theirs in zip(_steps(model, idx, 3, plan=True)[0], _steps(model, idx, 3, plan=False)[0]):
        assert ours.dtype == torch.float64 and torch.equal(ours, theirs)


@needs_cpu_backend
def test_generate_runs_the_plan_and_gives_the_uncached_tokens(monkeypatch):
    runs = []
    real_run = planned.PlannedGPTStep.run

    def counting_run(self, *args):
        runs.append(args[0].shape)
        return real_run(self, *args)

    monkeypatch.setattr(planned.PlannedGPTStep, "run", counting_run)
    model = make_model()
    idx = torch.randint(0, CFG["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(5))
    out = generate(model, idx, max_new_tokens=8, context_size=CFG["context_length"])
    assert runs == [(2, 1)] * 7  # every step after the prompt's
    expected = idx
    for _ in range(8):
        with torch.no_grad():
            expected = torch.cat((expected, model(expected)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, expected)


def _plan_of(model, batch=1):
    runner = CachedRunner(model)
    return runner._plan(torch.zeros(batch, 1, dtype=torch.long))


@needs_cpu_backend
def test_models_the_plan_cannot_vouch_for_keep_the_generic_step():
    assert _plan_of(make_model()) is not None
    # backend "torch": the modules run the book's formulas, not the kernels the plan would call
    with ops.use_backend("torch"):
        assert _plan_of(make_model()) is None
    # more rows than a decode step routes to the decode kernel
    assert _plan_of(make_model(), batch=DECODE_LINEAR_MAX_ROWS + 1) is None
    # active dropout
    training = make_model(drop_rate=0.1).train()
    assert _plan_of(training) is None
    assert _plan_of(make_model(drop_rate=0.1)) is not None  # eval mode: dropout does nothing
    # other modules: the reference's own GPT, PyTorch's GELU, a subclassed linear layer, float64 norms
    torch.manual_seed(0)
    assert _plan_of(ref_ch04.GPTModel(CFG).eval()) is None
    fast_ff = make_model()
    fast_ff.trf_blocks[1].ff = FeedForwardFast(CFG)
    assert _plan_of(fast_ff) is None

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = make_model()
    scaled.trf_blocks[0].att.out_proj.__class__ = Scaled
    assert _plan_of(scaled) is None
    mixed = make_model()
    mixed.final_norm.double()  # LayerNorm.forward promotes: the book's formula, not the kernel
    assert _plan_of(mixed) is None


@needs_cpu_backend
def test_hooks_keep_the_generic_step_and_are_called():
    model = make_model()
    seen = []
    handle = model.trf_blocks[2].norm2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    idx = torch.randint(0, CFG["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(2))
    generate(model, idx, max_new_tokens=5, context_size=CFG["context_length"])
    assert len(seen) == 5  # the prompt's pass and four decode steps
    assert _plan_of(model) is None
    handle.remove()
    assert _plan_of(model) is not None
    global_hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert _plan_of(model) is None
    finally:
        global_hook.remove()
    assert _plan_of(model) is not None
    # a forward set on an instance (a wrapper's patch) is skipped by the plan's kernels just the same
    norm = model.trf_blocks[1].norm1
    norm.forward = functools.partial(type(norm).forward, norm)
    assert _plan_of(model) is None
    del norm.forward
    assert _plan_of(model) is not None


@needs_cpu_backend
def test_a_non_contiguous_weight_takes_the_entry_point_with_the_same_result():
    model = make_model()
    layer = model.trf_blocks[1].ff.layers[0]
    layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())  # same values, transposed layout
    assert not layer.weight.is_contiguous()
    idx = torch.randint(0, CFG["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(4))
    planned_logits, runner = _steps(model, idx, 4, plan=True)
    generic_logits, _ = _steps(model, idx, 4, plan=False)
    plan = runner._plans[((2, 1), ops.get_backend())]
    assert plan is not None and sum(linear.rows is None for linear in plan.linears) == 1
    for ours, theirs in zip(planned_logits, generic_logits):
        assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- the kernels a plan binds


def _holding(guarded):
    """The context a rows form runs in: the caller's one guard for ``guarded`` forms (a plan's step), none else."""
    from gptfast.ops._dispatch import without_graph
    return without_graph() if guarded else contextlib.nullcontext()


@needs_cpu_backend
@pytest.mark.parametrize("guarded", [False, True])
def test_rows_forms_run_the_entry_points_kernels(guarded):
    from gptfast.ops import cpu_ops
    torch.manual_seed(0)
    rows, weight, bias = torch.randn(3, 20), torch.randn(7, 20), torch.randn(7)
    scale, shift = torch.randn(20), torch.randn(20)
    with torch.no_grad(), _holding(guarded):
        linear = decode_linear_rows(cpu_ops.decode_linear, guarded=guarded)
        assert torch.equal(linear(rows, weight, bias), cpu_ops.decode_linear(rows, weight, bias=bias))
        assert torch.equal(linear(rows, weight, None), cpu_ops.decode_linear(rows, weight))
        assert torch.equal(layer_norm_rows(cpu_ops.layer_norm, guarded=guarded)(rows, scale, shift, 1e-5),
                           cpu_ops.layer_norm(rows, scale, shift, eps=1e-5))
        assert torch.equal(gelu_rows(cpu_ops.gelu, guarded=guarded)(rows), cpu_ops.gelu(rows))


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4"])
def test_a_planned_step_holds_one_autograd_guard_for_its_kernels(monkeypatch, name):
    """The plan's rows kernels are bound without a guard of their own (``guarded``): the step enters one for
    all of them."""
    model = make_model() if name == "gpt" else _rotary(name)
    idx = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    runner = CachedRunner(model)
    cache = KVCache.for_model(model, 2, 9)
    counts = {"step": 0, "kernel": 0}

    def counting(key, real):
        def enter():
            counts[key] += 1
            return real()
        return enter

    with ops.use_backend("auto"):
        token = runner.prefill(idx, cache).argmax(-1, keepdim=True)
        token = runner.decode(token, cache, 5).argmax(-1, keepdim=True)  # the first step builds the plan
        monkeypatch.setattr(planned, "without_graph", counting("step", planned.without_graph))
        monkeypatch.setattr(_dispatch, "without_graph", counting("kernel", _dispatch.without_graph))
        for position in (6, 7):
            token = runner.decode(token, cache, position).argmax(-1, keepdim=True)
    assert runner._plans[((2, 1), "auto")] is not None
    assert counts == {"step": 2, "kernel": 0}


def test_rows_forms_exist_only_for_fused_entry_points():
    from gptfast.ops import torch_ops
    assert decode_linear_rows(torch_ops.decode_linear) is None
    assert layer_norm_rows(torch_ops.layer_norm) is None
    assert gelu_rows(torch_ops.gelu) is None
    assert gelu_rows(lambda x: x) is None  # a stand-in (a test's spy) keeps its own call
    assert _dispatch.bound_kernel(functools.partial(fused_gelu, "gptfast_cpu", 1), fused_gelu, "gelu_fwd") is None
    assert _dispatch.bound_kernel(functools.partial(fused_decode_linear, ops="x"), fused_decode_linear,
                                  "decode_linear") is None
    assert _dispatch.bound_kernel(functools.partial(fused_layer_norm, "gptfast_cpu"), fused_gelu, "gelu_fwd") is None


# ----------------------------------------------------------------------------- Llama 3 / Qwen3


ROTARY = {
    "qwen-ratio1": lambda dtype: qwen3.Qwen3Model(qwen_cfg(4, dtype=dtype)),
    "qwen-ratio2-no-qknorm": lambda dtype: qwen3.Qwen3Model(qwen_cfg(2, qk_norm=False, dtype=dtype)),
    "qwen-ratio4": lambda dtype: qwen3.Qwen3Model(qwen_cfg(1, dtype=dtype)),
    "qwen-cached": lambda dtype: qwen3_cached.Qwen3Model(qwen_cfg(2, dtype=dtype)),
    "qwen-batched": lambda dtype: qwen3_batched.Qwen3Model(qwen_cfg(2, dtype=dtype)),
    "llama-ratio2": lambda dtype: llama3.Llama3Model(llama_cfg(2, dtype=dtype)),
    "llama-cached-ratio4": lambda dtype: llama3_cached.Llama3Model(llama_cfg(1, dtype=dtype)),
}


def _rotary(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = ROTARY[name](dtype).eval()
    with torch.no_grad():  # RMSNorm weights of one: make the norms' weights matter
        for module in model.modules():
            for pname in ("scale", "weight"):
                weight = getattr(module, pname, None)
                if isinstance(module, (qwen3.RMSNorm, layers.BuiltinRMSNorm)) and weight is not None:
                    weight.uniform_(0.5, 1.5)
    return model


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(ROTARY))
def test_planned_rotary_steps_are_bitwise_the_generic_steps(name, batch, dtype):
    model = _rotary(name, dtype)
    idx = torch.randint(0, 97, (batch, 5), generator=torch.Generator().manual_seed(batch))
    with ops.use_backend("auto"):
        planned_logits, runner = _steps(model, idx, 6, plan=True)
        generic_logits, _ = _steps(model, idx, 6, plan=False)
    assert [key for key, plan in runner._plans.items() if plan is not None] == [((batch, 1), "auto")]
    for ours, theirs in zip(planned_logits, generic_logits):
        assert ours.shape == (batch, model.out_head.out_features)
        assert torch.equal(ours, theirs)


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4", "llama-ratio2"])
def test_planned_steps_match_the_full_forward(name):
    model = make_model() if name == "gpt" else _rotary(name)
    idx = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(idx)
    runner = CachedRunner(model)
    cache = KVCache.for_model(model, 2, 10)
    runner.prefill(idx[:, :4], cache)
    for p in range(4, 10):
        torch.testing.assert_close(runner.decode(idx[:, p:p + 1], cache, p), full[:, p], atol=1e-5, rtol=1e-5)
    assert runner._plans[((2, 1), ops.get_backend())] is not None


@needs_cpu_backend
def test_rotary_models_the_plan_cannot_vouch_for_keep_the_generic_step():
    assert _plan_of(_rotary("qwen-ratio2-no-qknorm")) is not None
    with ops.use_backend("torch"):
        assert _plan_of(_rotary("qwen-ratio1")) is None
    torch.manual_seed(0)
    assert _plan_of(qwen3.Qwen3Model(qwen_cfg(2, num_experts=4)).eval()) is None  # mixture of experts
    assert _plan_of(ref_qwen3.Qwen3Model(qwen_cfg(2)).eval()) is None  # the reference's own modules
    not_qwen_norms = _rotary("qwen-ratio1")
    not_qwen_norms.trf_blocks[1].att.q_norm.qwen3_compatible = False  # its forward then computes otherwise
    assert _plan_of(not_qwen_norms) is None
    hooked = _rotary("llama-ratio2")
    hooked.trf_blocks[0].ff.fc2.register_forward_pre_hook(lambda module, args: None)
    assert _plan_of(hooked) is None


def test_rotary_rows_forms_exist_only_for_fused_entry_points():
    from gptfast.ops import torch_ops
    from gptfast.ops.normalization import rms_norm_rows
    from gptfast.ops.rotary import rope_rows
    assert rms_norm_rows(torch_ops.rms_norm) is None and rope_rows(torch_ops.rope) is None
    assert swiglu_rows(torch_ops.swiglu) is None


@needs_cpu_backend
@pytest.mark.parametrize("guarded", [False, True])
def test_rotary_rows_forms_run_the_entry_points_kernels(guarded):
    from gptfast.ops import cpu_ops
    from gptfast.ops.normalization import rms_norm_rows
    from gptfast.ops.rotary import rope_rows
    torch.manual_seed(0)
    rows, weight = torch.randn(6, 8), torch.rand(8) + 0.5
    x, cos, sin = torch.randn(2, 3, 1, 8), torch.randn(1, 8), torch.randn(1, 8)
    with torch.no_grad(), _holding(guarded):
        assert torch.equal(rms_norm_rows(cpu_ops.rms_norm, guarded=guarded)(rows, weight, 1e-6),
                           cpu_ops.rms_norm(rows, weight, eps=1e-6))
        assert torch.equal(rope_rows(cpu_ops.rope, guarded=guarded)(x, cos, sin), cpu_ops.rope(x, cos, sin))
        assert torch.equal(swiglu_rows(cpu_ops.swiglu, guarded=guarded)(rows, rows.flip(0)),
                           cpu_ops.swiglu(rows, rows.flip(0)))


@needs_cpu_backend
def test_guarded_rows_forms_call_the_cpu_kernels_without_the_dispatcher():
    import sys
    from gptfast.ops import cpu_ops
    from gptfast.ops.normalization import rms_norm_rows
    from gptfast.ops.rotary import rope_rows
    extension = sys.modules[cpu_ops.LOADED]
    assert decode_linear_rows(cpu_ops.decode_linear, guarded=True) is extension.direct_decode_linear
    assert swiglu_rows(cpu_ops.swiglu, guarded=True) is extension.direct_swiglu_fwd
    assert gelu_rows(cpu_ops.gelu, guarded=True) is extension.direct_gelu_fwd
    assert rope_rows(cpu_ops.rope, guarded=True) is not None and rms_norm_rows(cpu_ops.rms_norm, guarded=True)
    # unguarded forms keep the op (its dispatcher enters the guard's effect itself)
    assert decode_linear_rows(cpu_ops.decode_linear) is not extension.direct_decode_linear
    # the kernels' own checks still hold: a bad call is a RuntimeError naming the problem, not a crash
    with pytest.raises(RuntimeError, match="weight must be"):
        extension.direct_decode_linear(torch.randn(2, 8), torch.randn(3, 5), None)


@needs_cpu_backend
def test_no_plan_for_a_model_holding_a_tensor_subclass():
    class Tagged(torch.Tensor):  # a subclass with its own torch-function handling: the plan must not skip it
        pass

    model = _rotary("qwen-ratio4")
    assert planned.rotary_plannable(model)
    model.final_norm.scale = torch.nn.Parameter(model.final_norm.scale.detach().as_subclass(Tagged))
    assert not planned.rotary_plannable(model)
    gpt = make_model()
    assert planned.plannable(gpt)
    gpt.out_head.weight = torch.nn.Parameter(gpt.out_head.weight.detach().as_subclass(Tagged))
    assert not planned.plannable(gpt)


@needs_cpu_backend
def test_a_rotary_plan_runs_swiglu_on_the_bound_kernel():
    model = _rotary("qwen-ratio4")
    runner = CachedRunner(model)
    cache = KVCache.for_model(model, 2, 9)
    with ops.use_backend("auto"):
        token = runner.prefill(torch.randint(0, 50, (2, 5)), cache).argmax(-1, keepdim=True)
        runner.decode(token, cache, 5)  # the first step builds the plan
    plan = runner._plans[((2, 1), "auto")]
    import sys
    from gptfast.ops import cpu_ops
    assert plan is not None and plan.swiglu is sys.modules[cpu_ops.LOADED].direct_swiglu_fwd


# ----------------------------------------------------------------------------- rows at their own positions


def _ragged_steps(model, lengths, n_steps, plan, seed_rows=None):
    """Prompts of ``lengths`` tokens prefilled row by row, then ``n_steps`` greedy steps with each row at its own
    position (the batched generator's step for prompts of different lengths).  Prompt ``r`` is drawn from seed
    ``11 + r``, or ``11 + seed_rows[r]`` (a row of another batch run alone)."""
    runner = CachedRunner(model)
    if not plan:
        runner._plan = lambda tokens: None
    cache = KVCache.for_model(model, len(lengths), max(lengths) + n_steps)
    seeds = seed_rows if seed_rows is not None else range(len(lengths))
    prompts = [torch.randint(0, 90, (1, n), generator=torch.Generator().manual_seed(11 + s))
               for n, s in zip(lengths, seeds)]
    logits = [torch.cat([runner.prefill(p, cache, torch.tensor([r])) for r, p in enumerate(prompts)])]
    positions = list(lengths)
    for _ in range(n_steps):
        logits.append(runner.decode(logits[-1].argmax(-1, keepdim=True), cache, positions))
        positions = [p + 1 for p in positions]
    return logits, runner


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4", "qwen-ratio2-no-qknorm", "llama-ratio2"])
def test_planned_steps_of_rows_at_their_own_positions_are_bitwise_the_generic_steps(name):
    model = make_model() if name == "gpt" else _rotary(name)
    planned_logits, runner = _ragged_steps(model, [3, 6, 4], 5, plan=True)
    generic_logits, _ = _ragged_steps(model, [3, 6, 4], 5, plan=False)
    assert runner._plans[((3, 1), ops.get_backend())] is not None
    for ours, theirs in zip(planned_logits, generic_logits):
        assert torch.equal(ours, theirs)


def test_position_runs_group_consecutive_rows_at_one_position():
    from gptfast.generation.runner import _position_runs

    assert _position_runs([3, 3, 5, 5, 5, 2]) == [(0, 2, 3), (2, 5, 5), (5, 6, 2)]
    assert _position_runs([4]) == [(0, 1, 4)] and _position_runs([]) == []
    assert _position_runs([1, 2, 1]) == [(0, 1, 1), (1, 2, 2), (2, 3, 1)]


def _count_calls(monkeypatch, module, name):
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@needs_cpu_backend
@pytest.mark.parametrize("name", ["qwen-ratio4", "llama-ratio2", "gpt", "qwen-ratio1"])
def test_rows_at_their_own_positions_attend_through_the_fused_op_over_their_own_keys(name, monkeypatch):
    """With grouped k/v, a fused backend's step runs the attention op once per run of rows at one position, over
    that row's keys (views of the cache); the masked dense attention is the torch backend's, and that of models
    with a kv head per query head (it copies nothing there).  Each row's logits are those of the row run alone."""
    from gptfast.generation import runner as runner_module

    model = make_model() if name == "gpt" else _rotary(name)
    lengths = [3, 6, 6, 4]
    masked = _count_calls(monkeypatch, runner_module, "masked_decode_attention")
    step_calls = _count_calls(monkeypatch, runner_module._StepAttention, "__call__")
    logits, _ = _ragged_steps(model, lengths, 3, plan=True)
    if name in ("gpt", "qwen-ratio1"):
        assert len(masked) == 3 * len(model.trf_blocks) and step_calls == []
        return
    assert masked == []
    # 3 runs (rows 0, 1-2, 3) per layer and step, each over its rows' keys 0..position: views of the cache.
    n_layers = len(model.trf_blocks)
    assert len(step_calls) == 3 * n_layers * 3
    first_step = step_calls[:3]
    assert [q.shape[0] for _, q, _, _ in first_step] == [1, 2, 1]
    assert [k.shape[2] for _, _, k, _ in first_step] == [4, 7, 5]
    assert all(k._base is not None for _, _, k, _ in step_calls)
    with ops.use_backend("torch"):
        oracle, _ = _ragged_steps(model, lengths, 3, plan=True)
    assert len(masked) > 0
    for ours, theirs in zip(logits, oracle):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for row, n in enumerate(lengths):  # each row by itself: the step of a one-row batch
        alone, _ = _ragged_steps(model, [n], 3, plan=True, seed_rows=[row])
        for ours, theirs in zip(logits, alone):
            torch.testing.assert_close(ours[row:row + 1], theirs, atol=1e-5, rtol=1e-5)


@needs_cpu_backend
@pytest.mark.parametrize("name", ["qwen-ratio4", "llama-ratio2"])
def test_rows_at_their_own_positions_rotate_through_the_rope_kernel(name):
    """Per-row positions go to the RoPE op with the positions (each row's table rows read by the kernel), in the
    generic step and the plan alike; backend ``"torch"`` keeps the per-row tables and the formula."""
    model = _rotary(name)
    runner = CachedRunner(model)
    x = torch.randn(3, 4, 1, model.cos.shape[1])
    positions = torch.tensor([[2], [7], [5]])
    rotated = runner._rotation(positions)(x)
    assert torch.equal(rotated, ops.rope(x, model.cos, model.sin, positions=positions, backend="cpu"))
    plan = planned.PlannedRotaryStep.build(model, torch.empty(3, 1, 32), lambda *args: None)
    rope, cos, sin = plan._rope_for(positions)
    assert torch.equal(rope(x, cos, sin), rotated)
    # Where no kernel binding exists the plan calls the entry point with the positions: the same numbers.
    entry_point = ops.fused_entry_point("rope", x.device, (x, model.cos, model.sin),
                                        {"offset": 0, "positions": positions})
    assert torch.equal(planned._rope_at(entry_point, x, model.cos, model.sin, positions), rotated)
    with ops.use_backend("torch"):
        formula = runner._rotation(positions)(x)
    cos, sin = model.cos[positions].unsqueeze(1), model.sin[positions].unsqueeze(1)
    assert torch.equal(formula, layers.rotate_half_rope(x, cos, sin))
    torch.testing.assert_close(rotated, formula, atol=1e-6, rtol=1e-6)


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4", "llama-ratio2"])
def test_prompts_of_different_lengths_prefill_in_one_padded_pass(name, monkeypatch):
    """The batched generator prefills prompts of different lengths right-padded in one pass (the weights read
    once) while padding is at most half of what it computes; each row's first logits and cached keys are those
    of its own pass, and its tokens those of the row run alone."""
    from gptfast.generation import decoding, generate_batch

    model = make_model() if name == "gpt" else _rotary(name)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 90, (n,), generator=generator) for n in (3, 6, 6, 4)]
    padded = _count_calls(monkeypatch, CachedRunner, "prefill_padded")
    per_length = _count_calls(monkeypatch, CachedRunner, "prefill")
    result = generate_batch(model, prompts, 5)
    assert len(padded) == 1 and per_length == []
    for b, p in enumerate(prompts):
        assert torch.equal(result.new_tokens(b), generate(model, p.unsqueeze(0), 5, 24)[0, len(p):])
    # The first logits and the cache against one pass per prompt.
    runner = CachedRunner(model)
    caches = [KVCache.for_model(model, 4, 10) for _ in range(2)]
    rows = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    together = runner.prefill_padded(rows, [len(p) for p in prompts], caches[0])
    alone = torch.cat([runner.prefill(p.unsqueeze(0), caches[1], torch.tensor([b])) for b, p in enumerate(prompts)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    for layer in range(len(caches[0].keys)):
        for b, p in enumerate(prompts):
            torch.testing.assert_close(caches[0].keys[layer][b, :, :len(p)], caches[1].keys[layer][b, :, :len(p)],
                                       atol=1e-5, rtol=1e-5)
    # The padding's slots are left zero: a dense masked pass weighs them 0, and 0 * inf would be NaN.
    for layer in range(len(caches[0].keys)):
        for b, p in enumerate(prompts):
            assert not caches[0].keys[layer][b, :, len(p):].any() and not caches[0].values[layer][b, :, len(p):].any()
    # Mostly padding: one pass per length instead.
    padded.clear()
    per_length.clear()
    generate_batch(model, [prompts[0][:1], prompts[1][:1], prompts[2]], 2)
    assert padded == [] and len(per_length) == 2
    assert decoding.PADDED_PREFILL_WASTE == 2
    # Backend "torch": one pass per length, so each row's first logits are bitwise its own pass's.
    per_length.clear()
    with ops.use_backend("torch"):
        generate_batch(model, prompts, 2)
    assert padded == [] and len(per_length) == 3


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4"])
def test_padded_prefill_with_rows_sliding_out_of_the_window_and_finishing_at_eos(name):
    """Rows prefilled together, then some finish at their eos (leaving the cache) and the others outgrow a small
    window (recomputed over it): every row's tokens are still those of the row run alone."""
    from gptfast.generation import generate_batch

    model = make_model() if name == "gpt" else _rotary(name)
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 90, (n,), generator=generator) for n in (3, 6, 6, 4)]
    singles = [generate(model, p.unsqueeze(0), 10, 8)[0, len(p):] for p in prompts]
    eos = [-1, int(singles[1][2]), -1, int(singles[3][5])]
    result = generate_batch(model, prompts, 10, context_size=8, eos_id=eos)
    for b, single in enumerate(singles):
        expected = single if eos[b] == -1 else single[:int((single == eos[b]).nonzero()[0])]
        assert torch.equal(result.new_tokens(b), expected), b


@needs_cpu_backend
@pytest.mark.parametrize("name", ["gpt", "qwen-ratio4"])
def test_the_static_shape_step_over_a_padded_prefill_equals_the_per_row_step(name):
    """``decode_static`` (what a CUDA graph captures) attends over the whole cache, the padding's slots included
    (zeroed and masked): it gives the per-row step's logits."""
    model = make_model() if name == "gpt" else _rotary(name)
    runner = CachedRunner(model)
    generator = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 90, (n,), generator=generator) for n in (3, 7, 5)]
    rows = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    caches = [KVCache.for_model(model, 3, 12) for _ in range(2)]
    for cache in caches:
        runner.prefill_padded(rows, [3, 7, 5], cache)
    tokens = torch.tensor([[5], [9], [2]])
    per_row = runner.decode(tokens, caches[0], [3, 7, 5])
    static = runner.decode_static(tokens, caches[1], torch.tensor([3, 7, 5]))
    assert torch.isfinite(static).all()
    torch.testing.assert_close(static, per_row, atol=1e-5, rtol=1e-5)
