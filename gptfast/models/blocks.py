"""The pre-norm transformer block's parts, shared by the GPT, Llama 3 and Qwen3 blocks."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


class PreNormBlock(nn.Module):
    """Holds ``att``, ``ff``, ``norm1`` and ``norm2``; subclasses define ``forward``.

    The caller builds ``att`` and ``ff`` (in that order, as arguments are evaluated) and this
    builds the two norms after them: the reference creates its parameters in exactly this
    order, so the same seed gives the same initial weights and the same state_dict order.
    """

    def __init__(self, att: nn.Module, ff: nn.Module, make_norm: Callable[[], nn.Module]):
        super().__init__()
        self.att = att
        self.ff = ff
        self.norm1 = make_norm()
        self.norm2 = make_norm()
