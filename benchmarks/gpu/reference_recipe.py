"""The reference's optimized single-GPU training recipe, written here as the GPU baseline.

``llms-from-scratch`` (ch05, "PyTorch performance tips for faster LLM training") speeds the
book's chapter-5 loop up with: the causal mask made on the fly, TF32 tensor cores, fused
AdamW, pinned memory, bfloat16, PyTorch's own LayerNorm/GELU, ``scaled_dot_product_attention``
(FlashAttention), ``torch.compile`` and the vocabulary padded to 50,304.  This module
rebuilds that recipe from the installed package's ``GPTModelFast`` (which has the SDPA
attention, built-in LayerNorm and GELU) so gptfast's ``gptfast.train`` can be compared
against it on the same GPU in the same run.

bf16 here means the model's weights themselves are cast to bfloat16 (``model.to(bfloat16)``),
the faster, less careful variant; ``pure_bf16=False`` uses fp32 weights with bf16 autocast
instead, as ``gptfast.train`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_VOCAB = 50304  # 50257 rounded up to a multiple of 64


def reference_config(context_length: int = 1024, drop_rate: float = 0.1) -> dict:
    """The book's GPT-2 124M config with the padded vocabulary."""
    return {"vocab_size": REFERENCE_VOCAB, "context_length": context_length, "emb_dim": 768, "n_heads": 12,
            "n_layers": 12, "drop_rate": drop_rate, "qkv_bias": False}


def _sdpa_attention_class():
    """gptfast's fused-qkv attention with its core swapped for ``scaled_dot_product_attention``."""
    from gptfast.models import PyTorchMultiHeadAttention

    class SDPAMultiHeadAttention(PyTorchMultiHeadAttention):
        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            dropout = self.dropout if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            return self.proj(context.transpose(1, 2).reshape(b, t, self.d_out))

    return SDPAMultiHeadAttention


def build_reference_model(cfg: dict):
    """``llms_from_scratch``'s GPTModelFast; where that package is missing (the GPU image lacks it),
    the same architecture from gptfast's copy with the attention core set to SDPA."""
    try:
        from llms_from_scratch.ch04 import GPTModelFast

        return GPTModelFast(cfg), "llms_from_scratch.ch04.GPTModelFast"
    except ImportError:
        from gptfast.models import GPTModelFast

        model = GPTModelFast(cfg)
        sdpa = _sdpa_attention_class()
        for block in model.trf_blocks:
            block.att.__class__ = sdpa
        return model, "gptfast.models.GPTModelFast with SDPA attention (llms_from_scratch not installed)"


class ReferenceRecipe:
    """Model, optimizer and one training step of the reference's optimized recipe."""

    def __init__(self, context_length=1024, device="cuda", drop_rate=0.1, pure_bf16=True, compile=True,
                 lr=4e-4, weight_decay=0.1, seed=123):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(seed)
        self.cfg = reference_config(context_length, drop_rate)
        model, self.model_source = build_reference_model(self.cfg)
        model = model.to(self.device)
        self.autocast_dtype = None
        if pure_bf16:
            model = model.to(torch.bfloat16)
        elif on_cuda:
            self.autocast_dtype = torch.bfloat16
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=on_cuda)
        self.forward = torch.compile(model) if compile else model

    def train_step(self, inputs, targets) -> torch.Tensor:
        """One optimizer step on a batch (chapter 5's loop body); returns the loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else _nullcontext()
        with ctx:
            logits = self.forward(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def random_batch(batch_size, context_length, device, vocab=50257, seed=0):
    """A pinned, transferred batch of random token windows (the recipe's data path minus the file)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (batch_size, context_length + 1), generator=generator)
    if torch.device(device).type == "cuda":
        rows = rows.pin_memory()
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
