"""Checks shared by the drop-in model tests (Llama 3, Qwen3): a gptfast module against the reference's.

Each helper takes the two modules or models, so one file of checks serves every model family.
"""

from __future__ import annotations

import inspect

import torch

from gptfast import ops
from hf_checkpoints import hf_state_dict


def public_members(module):
    """The public classes and functions defined in ``module`` itself (not imported into it)."""
    return {n: o for n, o in vars(module).items() if not n.startswith("_")
            and getattr(o, "__module__", None) == module.__name__ and (inspect.isclass(o) or inspect.isfunction(o))}


def signature(obj):
    """Parameter names, kinds and defaults of ``obj``: what a caller of the drop-in relies on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def assert_same_public_api(ours, ref, count):
    """Every one of the ``count`` public names of ``ref`` exists in ``ours`` with the same signature
    (for classes also ``forward``/``encode``/``decode``)."""
    members = public_members(ref)
    assert len(members) == count, sorted(members)
    for name, obj in members.items():
        assert hasattr(ours, name), f"{ours.__name__} lacks {name}"
        assert signature(getattr(ours, name)) == signature(obj), f"{name} signature differs"
        if inspect.isclass(obj):
            for method in ("forward", "encode", "decode"):
                if hasattr(obj, method):
                    assert signature(getattr(getattr(ours, name), method)) == signature(getattr(obj, method)), \
                        f"{name}.{method} signature differs"


def seeded_pair(ref, ours, cls_name, cfg, seed=123):
    """The reference's and our ``cls_name(cfg)``, each built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    r = getattr(ref, cls_name)(cfg)
    torch.manual_seed(seed)
    o = getattr(ours, cls_name)(cfg)
    return r, o


def assert_logits_bitwise(r, o, vocab_size, seq_len, dtype):
    """Random ``(2, seq_len)`` ids give bitwise the reference's logits, of ``dtype``, with the torch backend."""
    idx = torch.randint(0, vocab_size, (2, seq_len))
    with torch.no_grad(), ops.use_backend("torch"):
        expected, got = r(idx), o(idx)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)


def assert_training_gradients_bitwise(r, o, vocab_size):
    """One cross-entropy backward on random ``(2, 12)`` ids gives bitwise the reference's gradients."""
    idx = torch.randint(0, vocab_size, (2, 12))
    target = torch.randint(0, vocab_size, (2, 12))
    with ops.use_backend("torch"):
        for model in (r, o):
            torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), target.flatten()).backward()
    for (name, p), q in zip(o.named_parameters(), r.parameters()):
        assert torch.equal(p.grad, q.grad), f"gradient of {name} differs"


def assert_loaded_like_the_reference(o, r, params, tie_embeddings, vocab_size):
    """After both loaders ran on ``params``: equal state dicts, the same Hugging Face tensors back out
    of ours, and bitwise equal logits with the torch backend."""
    for (key, a), b in zip(o.state_dict().items(), r.state_dict().values()):
        assert torch.equal(a, b), key
    again = hf_state_dict(o.state_dict(), tie_embeddings)
    assert set(again) == set(params) and all(torch.equal(again[k], params[k]) for k in params)
    idx = torch.randint(0, vocab_size, (2, 11))
    with torch.no_grad(), ops.use_backend("torch"):
        assert torch.equal(o(idx), r(idx))


def assert_parameter_count(ours, ref, cls_name, config, total, without_embedding):
    """Our ``cls_name`` of the real ``config`` has the reference's parameter count and, where given, the
    book's figures (``total``; ``without_embedding``: less the token embedding)."""
    with torch.device("meta"):  # shapes only, no memory
        o, r = getattr(ours, cls_name)(getattr(ours, config)), getattr(ref, cls_name)(getattr(ref, config))
    count = sum(p.numel() for p in o.parameters())
    assert count == sum(p.numel() for p in r.parameters())
    if total is not None:
        assert count == total and count - o.tok_emb.weight.numel() == without_embedding


def assert_blocks_of_the_users_get_the_references_mask(ref, r, o, cfg, seq_len=7):
    """The model hands its blocks the reference's causal mask, so a block of the reference's own class (put in
    by the user) computes as there, and a hook on gptfast's attention sees a real mask."""
    seen = []
    o.trf_blocks[0].att.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    for model in (r, o):
        state = model.trf_blocks[1].state_dict()
        model.trf_blocks[1] = ref.TransformerBlock(cfg)
        model.trf_blocks[1].load_state_dict(state)
    x = torch.randint(0, cfg["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = r(x)
        with ops.use_backend("torch"):
            assert torch.equal(o(x), expected)
        torch.testing.assert_close(o(x), expected, atol=1e-5, rtol=1e-5)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    assert len(seen) == 2 and all(isinstance(m, torch.Tensor) and torch.equal(m, causal) for m in seen)
