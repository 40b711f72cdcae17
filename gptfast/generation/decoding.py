"""The decoding loop behind every generation entry point: one :class:`Decoder` per call.

The steps follow the reference exactly:

* each step the model sees the last ``context_size`` tokens of a row.  While the
  row fits, that is the cache plus one new token.  Once it is longer, every
  position of the window shifts by one per step and position embeddings are
  absolute, so no cached key stays valid: such rows recompute their window each
  step (one forward pass, head on the last position only), which is what the
  reference computes, minus the head over the other positions;
* sampling goes through :func:`gptfast.ops.sampler` (``sample_next_token`` with its
  arguments checked once per call) on a ``(B, vocab)``
  logits tensor with every row of the batch, each step, so a seeded run draws the
  same random numbers as the reference (finished rows keep their last logits:
  their draw is consumed and thrown away, as the reference's padding does).

Every argument (prompts, lengths, sampling settings, eos ids) is checked once, when
the :class:`Decoder` is built, before any model work.  Prompts of one length are
prefilled together; rows then decode together at per-row positions.  Rows that
finish leave the cache, so they stop costing work (except on the CUDA-graph path,
whose batch shape is fixed: there a finished row rides along for free in the
weight-bound step).  On CPU the steps after the prompt run with torch's thread
count or with one thread, whichever the first steps time faster (see
:class:`DecodeThreads`).  Models without the book's ``GPTModel`` layout (or a Llama 3 / Qwen3 decoder's) fall back
to the uncached loop, and so do models whose forward the cached passes would not reproduce: a hook, a
patched ``forward`` or a subclass's own forward over gptfast's or the reference's, on the model, a block or an
attention module, or dropout active in training mode (:func:`~gptfast.generation.cache.walk_reproduces_forward`).
"""

from __future__ import annotations

import numbers
import os
import time

import torch

from .. import ops
from ..models.layers import embedding_rows
from ..ops._checks import INTEGER_DTYPES, as_int
from .cache import KVCache, context_length, is_decodable, prepare_model, walk_needs_probe, walk_reproduces_forward
from .cuda_graphs import captured_decoder, graph_capturable
from .runner import CachedRunner


# ----------------------------------------------------------------------------- validation

# A row's top_k of None before the first logits show the vocabulary's size (a model without a linear head).
_WHOLE_VOCABULARY = 2**62
# New-token positions the token buffer starts with (it doubles when a run goes on).
_FIRST_ROOM = 256
# Prompts of different lengths are prefilled together, right-padded, while the padded pass computes at most this
# many times their tokens; beyond that, one pass per length (each reads the weights again, but pads cost more).
# Qwen3-0.6B bf16, 8 prompts of 4-28 tokens (1.75x): one pass 0.55 s against 1.24-1.40 s, 2 cores.
PADDED_PREFILL_WASTE = 2


def require_int(name, value, minimum):
    """``value`` (an int or a 0-d integer tensor) as an int of at least ``minimum``; else an error naming ``name``."""
    value = as_int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def model_device(model):
    """The device of the model's first parameter: CPU for a module without parameters, None for a callable
    that is not a module (its inputs stay where they are, as in the reference's loop)."""
    if not isinstance(model, torch.nn.Module):
        return None
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_prompt_tokens(name, tokens, vocab_size):
    """``TypeError`` unless ``tokens`` holds integers (a float id is never rounded), ``ValueError`` for ids
    outside ``[0, vocab_size)`` (checked for CPU tensors; a device tensor would cost a sync)."""
    if tokens.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if vocab_size is not None and tokens.device.type == "cpu" and tokens.numel() > 0:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside [0, {vocab_size})")


def vocab_size(model):
    """Rows of the model's token embedding, or None for a model without the book's ``tok_emb``."""
    tok_emb = getattr(model, "tok_emb", None)
    return tok_emb.weight.shape[0] if isinstance(tok_emb, torch.nn.Embedding) else None


def logits_size(model):
    """Columns of the model's logits: its ``out_head``'s outputs (a classifier's head may have 2; a LoRA-wrapped
    head those of the layer it wraps), or None when only the first logits can tell."""
    from ..finetuning.lora import LinearWithLoRA  # (the fine-tuning package imports generation)
    from ..models.blocks import runs_own_forward

    head = getattr(model, "out_head", None)
    if isinstance(head, LinearWithLoRA) and runs_own_forward(head):
        head = head.linear  # linear(x) + lora(x): the low-rank part has the wrapped layer's outputs
    return head.out_features if isinstance(head, torch.nn.Linear) else None


def check_idx(idx, model):
    """Check the reference API's ``idx``: a non-empty ``(batch, tokens)`` tensor of in-vocabulary ids."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a (batch, tokens) torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (batch, tokens) tensor, got shape {tuple(idx.shape)}")
    check_prompt_tokens("idx", idx, vocab_size(model))


def _per_row(name, value, batch, device, dtype):
    """A scalar stays a python number; a sequence/tensor becomes a ``(batch,)`` tensor on ``device``."""
    if value is None or isinstance(value, numbers.Number) and not isinstance(value, torch.Tensor):
        return value
    tensor = _as_numbers(name, value, device)
    if not dtype.is_floating_point and (tensor.dtype.is_floating_point or tensor.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {tensor.dtype}")
    if tensor.dim() == 0:
        return tensor.item()
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must be a number or have one value per prompt ({batch}), got shape "
                         f"{tuple(tensor.shape)}")
    return tensor.to(dtype)


def _as_numbers(name, value, device):
    """``value`` as a tensor of numbers, or a ``TypeError`` naming ``name`` (a string, or None among numbers)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            # torch.as_tensor([True, 2]) is [1, 2]: the bool would pass as a number unseen.
            if isinstance(item, bool):
                raise TypeError(f"{name} must hold numbers, not booleans, got {value!r}")
            _require_int64(name, item)
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number or one number per prompt, got {value!r}") from None


def _require_int64(name, value) -> None:
    """``ValueError`` naming ``name`` for a Python integer outside int64 (torch's own error names nothing)."""
    if isinstance(value, numbers.Integral) and not -2**63 <= int(value) < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")


def _eos_tensor(eos_id, batch, device):
    """``(batch,)`` int64 end-of-sequence ids, -1 where a row has none; ``None`` when no row has one."""
    if eos_id is None:
        return None
    eos_id = as_int(eos_id)
    if isinstance(eos_id, numbers.Integral) and not isinstance(eos_id, bool):
        _require_int64("eos_id", eos_id)
        return torch.full((batch,), int(eos_id), dtype=torch.long, device=device)
    if isinstance(eos_id, bool):
        raise TypeError("eos_id must be None, an int or one int per row, got bool")
    values = [(-1 if e is None else e) for e in eos_id] if isinstance(eos_id, (list, tuple)) else eos_id
    tensor = _as_numbers("eos_id", values, device)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"eos_id must hold integers, got {tensor.dtype}")
    if tensor.shape != (batch,):
        raise ValueError(f"eos_id must be an int or have one value per prompt ({batch}), got shape "
                         f"{tuple(tensor.shape)}")
    return tensor.to(torch.long)


# ----------------------------------------------------------------------------- the decoding loop


def _fixed_decode_threads() -> int | None:
    """``$GPTFAST_DECODE_THREADS`` as a positive thread count, or None where it is unset or empty."""
    text = os.environ.get("GPTFAST_DECODE_THREADS", "").strip()
    if not text:
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"GPTFAST_DECODE_THREADS must be a positive whole number of threads, got {text!r}")
    return count


class DecodeThreads:
    """The torch thread count for CPU decode steps: torch's own setting or one thread, whichever is faster.

    Applied to whole steps after the prompt's (the cached token, window recomputes, sampling).

    A decode step is a chain of small ops around matrix-vector products bound by
    memory bandwidth.  With several OpenMP threads every op ends at a barrier, and
    on a busy machine a descheduled worker stalls each one for milliseconds, while a
    single thread often reads the weights about as fast.  The first four decode steps
    alternate the two settings; the faster (by each one's best time) runs the rest.
    ``$GPTFAST_DECODE_THREADS`` fixes the count instead.  The setting is applied
    around each step only and restored after it.  (The matrix-vector products split
    over output rows, so the logits do not depend on the choice.)
    """

    def __init__(self):
        fixed = _fixed_decode_threads()
        current = torch.get_num_threads()
        self.chosen = fixed if fixed else (current if current == 1 else None)
        self.candidates = [current, 1]
        self.best = {n: float("inf") for n in self.candidates}
        self.trials = 0

    def run(self, fn):
        threads = self.chosen or self.candidates[self.trials % 2]
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
        finally:
            torch.set_num_threads(saved)
        if self.chosen is None:
            self.best[threads] = min(self.best[threads], elapsed)
            self.trials += 1
            if self.trials == 4:
                self.chosen = min(self.candidates, key=self.best.__getitem__)
        return out



class Decoder:
    """State of one generation run; :meth:`step` produces the next token of every row.

    ``seq`` ``(B, longest prompt + max_new_tokens)`` holds each row's prompt at
    ``[0, prompt_len)`` followed by its new tokens; after ``step`` calls every
    row has ``prompt_len + step`` tokens (finished rows are padded with their eos).
    """

    def __init__(self, model, prompts, max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                 *, dtype=None, cuda_graph=None):
        self.max_new_tokens = require_int("max_new_tokens", max_new_tokens, 0)
        self.context_size = require_int("context_size", context_size, 1)
        # A model the cache code can walk, whose forward the walk reproduces (no hook, no patched forward, no
        # active dropout), takes the cached passes; the others run the reference's uncached loop.
        self.decodable = is_decodable(model)
        self.cached = self.decodable and walk_reproduces_forward(model)
        self.probe = self.cached and walk_needs_probe(model)
        if dtype is not None and not self.decodable:
            raise TypeError("dtype needs a model with the book's GPTModel layout or a Llama 3 / Qwen3 decoder")
        self.model = model  # replaced by its converted copy once every argument is checked
        device = model_device(model) or prompts[0].device
        self.device = device
        self.batch = len(prompts)
        self.prompt_lens = [int(p.shape[0]) for p in prompts]
        for r, p in enumerate(prompts):
            if p.device != device:
                raise ValueError(f"prompt {r} is on {p.device} but the model is on {device}")
        # Room for the prompts and the first new tokens; grown as they come (an eos may end a long request early).
        room = max(self.prompt_lens) + min(self.max_new_tokens, _FIRST_ROOM)
        self.seq = torch.zeros(self.batch, room, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            self.seq[r, :p.shape[0]] = p
        self.steps = 0
        self._check_fits_model(context_size)

        self.temperature = _per_row("temperature", temperature, self.batch, device, torch.float32)
        vocab = logits_size(self.model) or vocab_size(self.model)
        if isinstance(top_k, (list, tuple)):  # None in a row: keep the whole vocabulary (known by the first logits)
            top_k = [(vocab or _WHOLE_VOCABULARY) if k is None else k for k in top_k]
        self.top_k = _per_row("top_k", top_k, self.batch, device, torch.int64)
        self.generator = generator
        # The sampling arguments are checked here, once per call and before any model work (values of
        # per-row tensors on CPU only); every step then draws without checking them again.
        # A model without a linear out_head gets its sampler once its first logits show their size.
        self.sampling = dict(temperature=self.temperature, top_k=self.top_k, generator=generator)
        self.draw = ops.sampler(self.batch, vocab, device, **self.sampling) if logits_size(self.model) else None
        self.eos = _eos_tensor(eos_id, self.batch, device)
        self.finished = [False] * self.batch
        self.new_counts = [0] * self.batch
        self.finished_at_eos = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.logits = None

        if self.decodable and dtype is not None:
            self.model = prepare_model(model, dtype)
        self.runner = CachedRunner(self.model) if self.cached else None
        self.cache = None
        self.cache_rows: list[int] = []  # original row ids held by the cache, in cache order
        self.graph = None
        capturable = not self.cached or graph_capturable(self.model)
        self.use_graph = (device.type == "cuda" and capturable) if cuda_graph is None else bool(cuda_graph)
        if self.use_graph and not capturable:
            raise ValueError("cuda_graph=True needs a decode step with static shapes; this model's "
                             "mixture-of-experts feed-forward routes tokens with host reads (use cuda_graph=None)")
        if self.use_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, got {device}")
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self.threads = DecodeThreads() if device.type == "cpu" else None

    def _check_fits_model(self, context_size):
        """The longest input the model will see must have position embeddings."""
        if not self.decodable or self.max_new_tokens == 0:
            return
        longest = min(context_size, max(self.prompt_lens) + self.max_new_tokens - 1)
        limit = context_length(self.model)
        if longest > limit:
            raise ValueError(
                f"context_size {context_size} lets inputs grow to {longest} tokens, but the model has only "
                f"{limit} positions: use context_size <= {limit}")

    # -- helpers ----------------------------------------------------------------------------

    def length(self, row):
        return self.prompt_lens[row] + self.steps

    def _index(self, rows):
        """A device index tensor for ``rows`` (cached: building one on CUDA costs a copy)."""
        key = tuple(rows)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self._index_cache[key]

    def _window(self, rows):
        """The last ``context_size`` tokens of each of ``rows`` (all longer than it)."""
        c = self.context_size
        return torch.stack([self.seq[r, self.length(r) - c:self.length(r)] for r in rows])

    def _make_room(self, length):
        """Grow ``seq`` (doubling, up to the prompts plus ``max_new_tokens``) so it holds ``length`` tokens a row."""
        if length <= self.seq.shape[1]:
            return
        room = min(max(length, 2 * self.seq.shape[1]), max(self.prompt_lens) + self.max_new_tokens)
        grown = self.seq.new_zeros((self.batch, room))
        grown[:, :self.seq.shape[1]] = self.seq
        self.seq = grown

    def _put(self, rows, logits):
        if self.logits is None:
            # The model's own dtype: the reference draws from its logits as they are, and rounding float64
            # logits to float32 could merge the two largest (a different greedy token).
            self.logits = torch.zeros(self.batch, logits.shape[-1], dtype=logits.dtype, device=self.device)
        if rows == list(range(self.batch)):
            self.logits.copy_(logits)
        else:
            self.logits.index_copy_(0, self._index(rows), logits.to(self.logits.dtype))

    # -- computing the logits of every unfinished row ---------------------------------------

    def _uncached_logits(self, active):
        """The reference's step for models the cache code cannot walk: the whole window, every position."""
        for t in sorted({self.prompt_lens[r] for r in active}):
            group = [r for r in active if self.prompt_lens[r] == t]
            idx = self.seq[self._index(group), :self.length(group[0])][:, -self.context_size:]
            with torch.no_grad():
                self._put(group, self.model(idx)[:, -1, :])

    def _prefill(self, active):
        """Step 0: the cache for rows whose prompt fits the window, window passes for the others."""
        fitting = [r for r in active if self.prompt_lens[r] <= self.context_size]
        windowed = [r for r in active if r not in fitting]
        if fitting:
            max_len = min(self.context_size, max(self.prompt_lens) + self.max_new_tokens - 1)
            self.cache_rows = fitting
            if self.use_graph:
                self.graph = captured_decoder(self.runner, len(fitting), max_len)
                self.cache = self.graph.cache
            else:
                self.cache = KVCache.for_model(self.model, len(fitting), max_len)
            lengths = [self.prompt_lens[r] for r in fitting]
            # Backend "torch" keeps one pass per length: each row's first logits stay bitwise its own pass's.
            padded = len(set(lengths)) > 1 and len(fitting) * max(lengths) <= PADDED_PREFILL_WASTE * sum(lengths)
            if padded and ops.get_backend() != "torch":
                # One pass over the prompts right-padded to the longest: the weights are read once, not once per
                # length.
                self._put(fitting, self.runner.prefill_padded(self.seq[self._index(fitting), :max(lengths)],
                                                              lengths, self.cache))
                return self._prefill_windowed(windowed)
            # One pass per distinct prompt length: no padding, so attention needs no mask.
            for t in sorted(set(lengths)):
                group = [r for r in fitting if self.prompt_lens[r] == t]
                slots = None if len(group) == len(fitting) else self._index([fitting.index(r) for r in group])
                self._put(group, self.runner.prefill(self.seq[self._index(group), :t], self.cache, slots))
        self._prefill_windowed(windowed)

    def _prefill_windowed(self, windowed):
        """Rows whose prompt is longer than the window: a pass over their last ``context_size`` tokens."""
        if windowed:
            self._put(windowed, self.runner.last_logits(self._window(windowed)))

    def _probe_walk(self, active):
        """Compare the cached prefill's logits with the model's own forward (for classes outside gptfast and the
        reference): a model computing otherwise (another block formula with the book's names) runs uncached
        from here on.  Either way this step keeps the model's own logits, the reference's values."""
        walked = self.logits.clone()
        self._uncached_logits(active)
        rows = self._index(active)
        if not (_same_logits(walked.index_select(0, rows), self.logits.index_select(0, rows), self._walk_dtype())
                and self._walk_reaches_the_runs_length()):
            self.release()
            self.cached, self.runner, self.cache = False, None, None

    @torch.no_grad()
    def _walk_reaches_the_runs_length(self) -> bool:
        """The prompt shows only its own positions: a forward that treats later ones otherwise (a window over
        the keys, say), or one whose difference a one-token prompt hides (a softmax over one key is 1), or a
        part that mixes positions (a decode step shows it one), would pass that check.  So random tokens
        (from a generator of their own: the caller's stream is untouched) as long as this run's inputs grow
        are walked, the prompt part then two decode steps, and compared with the forward over all of them."""
        length = min(self.context_size, max(self.prompt_lens) + self.max_new_tokens - 1)
        if length < 2:
            return True  # the run never attends over more than the prompt's one position
        width = embedding_rows(self.model.tok_emb, self.logits.shape[-1])
        generator = torch.Generator(device=self.device).manual_seed(0)
        tokens = torch.randint(0, width, (1, length), generator=generator, device=self.device)
        cache = KVCache.for_model(self.model, 1, length)
        prefix = max(1, length - 2)
        walked = [self.runner.prefill(tokens[:, :prefix], cache)]
        walked += [self.runner.decode(tokens[:, p:p + 1], cache, p) for p in range(prefix, length)]
        own = self.model(tokens)[0, prefix - 1:]
        return _same_logits(torch.cat(walked).to(own.dtype), own, self._walk_dtype())

    def _walk_dtype(self):
        """The dtype of the cached passes' weights (the first attention's key projection)."""
        return self.model.trf_blocks[0].att.W_key.weight.dtype

    def _decode(self, active):
        """Later steps: one cached token for rows that still fit, a window recompute for the others."""
        fitting = [r for r in self.cache_rows if r in active and self.length(r) <= self.context_size]
        windowed = [r for r in active if r not in fitting]
        if fitting and self.graph is not None:
            self._graph_step(fitting)
        elif fitting:
            if fitting != self.cache_rows:  # finished or windowed rows leave the cache
                self.cache.keep_rows(self._index([self.cache_rows.index(r) for r in fitting]))
                self.cache_rows = fitting
            positions = [self.length(r) - 1 for r in fitting]
            tokens = self.seq[self._index(fitting), positions[0]:positions[0] + 1] if len(set(positions)) == 1 \
                else torch.stack([self.seq[r, p:p + 1] for r, p in zip(fitting, positions)])
            self._put(fitting, self.runner.decode(
                tokens, self.cache, positions[0] if len(set(positions)) == 1 else positions))
        if windowed:
            self._put(windowed, self.runner.last_logits(self._window(windowed)))

    def _graph_step(self, fitting):
        """Replay the captured step for every cache row; rows not in ``fitting`` compute throwaway values."""
        rows = self.cache_rows
        index = self._index(rows)
        # Each row's last token is at prompt_len + steps - 1: one gather with a device index, no host sync.
        last = self._index([self.prompt_lens[r] - 1 for r in rows]) + self.steps
        last = last.clamp_(max=self.seq.shape[1] - 1)
        tokens = self.seq[index].gather(1, last.unsqueeze(1))
        positions = last.clamp(max=self.cache.max_len - 1)
        logits = self.graph.step(tokens, positions)
        self._put(fitting, logits if fitting == rows else logits[self._index([rows.index(r) for r in fitting])])

    def _mark_finished(self, next_token):
        """Rows whose draw is their eos id finish now (one host read per step, only with eos ids)."""
        self.finished_at_eos.logical_or_(next_token.squeeze(1) == self.eos)
        for r, done in enumerate(self.finished_at_eos.tolist()):
            if done and not self.finished[r]:
                self.finished[r] = True
                self.new_counts[r] = self.steps

    def new_token_counts(self):
        """Tokens each row generated (its eos and the padding after it excluded)."""
        return [self.new_counts[r] if self.finished[r] else self.steps for r in range(self.batch)]

    # -- one step ------------------------------------------------------------------------------

    def release(self):
        """Hand a shared captured step back (its cache may then serve another run)."""
        graph = getattr(self, "graph", None)  # absent when __init__ raised
        if graph is not None:
            graph.busy = False
            self.graph = None

    def __del__(self):
        self.release()

    def step(self):
        """Sample the next token of every row: ``(B, 1)``, or ``None`` when every row has finished."""
        # CPU steps after the prompt's run with the thread count _DecodeThreads picks (sampling included:
        # its small ops stall at OpenMP barriers just the same).
        use_threads = self.threads is not None and self.cached and self.steps > 0
        token = self.threads.run(self._step) if use_threads else self._step()
        if token is None:
            self.release()
        return token

    def _step(self):
        if self.steps >= self.max_new_tokens or all(self.finished):
            return None
        active = [r for r in range(self.batch) if not self.finished[r]]
        if not self.cached:
            self._uncached_logits(active)
        elif self.steps == 0:
            self._prefill(active)
            if self.probe:
                self._probe_walk(active)
        else:
            self._decode(active)
        if self.draw is None:
            width = self.logits.shape[-1]
            if isinstance(self.top_k, torch.Tensor):  # rows keeping the whole vocabulary, now that it is known
                self.sampling["top_k"] = self.top_k.masked_fill(self.top_k == _WHOLE_VOCABULARY, width)
            self.draw = ops.sampler(self.batch, width, self.device, **self.sampling)
        next_token = self.draw(self.logits)
        if self.eos is not None:
            self._mark_finished(next_token)
            if all(self.finished):
                return None
            next_token = torch.where(self.finished_at_eos.unsqueeze(1), self.eos.unsqueeze(1), next_token)
        positions = self._index(self.prompt_lens) + self.steps
        self._make_room(max(self.prompt_lens) + self.steps + 1)
        self.seq.scatter_(1, positions.unsqueeze(1), next_token)
        self.steps += 1
        return next_token


def _same_logits(walked, own, dtype) -> bool:
    """Whether two computations of the same rows' logits agree up to rounding: the same non-finite entries and,
    per row, a difference small against the row's size (1e-3 of it in float32; 16-bit weights round
    every layer, so 0.1 there).  Another formula gives differences of the logits' own size."""
    if not all(torch.equal(test(own), test(walked)) for test in (torch.isnan, torch.isposinf, torch.isneginf)):
        return False
    finite = torch.isfinite(own)
    walked, own = walked.masked_fill(~finite, 0), own.masked_fill(~finite, 0)
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 0.1
    size = own.norm(dim=-1).clamp_min(1e-6)
    return bool(((walked - own).norm(dim=-1) <= tolerance * size).all())


def decoder_for_idx(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, generator, **options):
    check_idx(idx, model)
    return Decoder(model, list(idx), max_new_tokens, context_size, temperature, top_k, eos_id, generator,
                    **options)
