"""The decoding fast path: the model's blocks and heads as the same functions in fewer calls.

Decoding a token of a small model is a chain of tiny products whose fixed cost per call
dominates on CPU. ``FastDecoder.of(model)`` offers ``run_blocks``, ``unembed`` and
``unembed_short`` with the model's signatures. Two layouts, chosen per model (``layout_of``):

- ``folded``: from copies of the weights laid out for a few rows at a time (norm gains folded
  in, queries/keys/values in one product, transposed). Fastest for small fp32 models, at the
  cost of a second copy of the weights.
- ``in_place``: from the model's own weights through ``kernels.linear`` (``F.linear``, or for
  bf16 on CPU a kernel that reads weights at the memory bandwidth), no copy. For models whose
  weights exceed ``COPY_LIMIT_BYTES`` (there each product reads megabytes and the calls' fixed
  cost no longer matters, while a copy would double the memory), and for half precision on CPU
  (products of transposed bf16/fp16 copies are 2.5x / 100x slower than ``F.linear``'s).

The copies follow weight changes; inside a ``decoding()`` scope each is checked only once.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from layerskip import kernels
from layerskip.cache import KVCache
from layerskip.fastblock import FastBlock, InPlaceBlock, block_weights, rms_norm
from layerskip.model import Transformer, normalize

FEW_ROWS = 16  # unembed at most this many rows on CPU through the head's transposed copy
# Decoding copies only for models whose weights take at most this many bytes (fp32: 268M
# parameters; the copies were 1.3x faster at every fp32 size measured, up to 157M), larger ones
# decode from their own weights. Read when copies are built, so tests and benchmarks may change it.
COPY_LIMIT_BYTES = 2**30
FOLDED, IN_PLACE = "folded", "in_place"
T = TypeVar("T")

# The current `decoding()` scope (None outside one): while it lasts, weights do not change.
_DECODING_SCOPE: ContextVar[object | None] = ContextVar("layerskip_decoding_scope", default=None)


@contextmanager
def decoding() -> Iterator[None]:
    """Inference mode with the weights held fixed: the scope every decoding strategy runs in.

    Usable as ``with decoding():`` or ``@decoding()``. Inside it, each copy in a
    DerivedWeights is checked against its weights once, at first use, instead of on every
    call: decoding asks for a block's copies on every block of every token, and checking
    nine weights costs a noticeable share of a small block. Change no weight inside.
    """
    with torch.inference_mode():
        token = _DECODING_SCOPE.set(object()) if _DECODING_SCOPE.get() is None else None
        try:
            yield
        finally:
            if token is not None:
                _DECODING_SCOPE.reset(token)


def _weight_key(w: torch.Tensor) -> tuple | None:
    """Identity + version of a weight, to know when a copy derived from it is stale (None: untracked)."""
    try:
        return (w.data_ptr(), w._version, w.dtype, w.device)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class DerivedWeights:
    """Copies derived from weights for decoding (transposed, stacked, ...), rebuilt when a weight changes.

    ``get(name, sources, build)`` returns the cached ``build()`` while every weight in
    ``sources()`` keeps its identity and version, rebuilds it otherwise, and returns None when
    a weight has no version counter (made in inference mode), since staleness could then go
    unnoticed. Within one ``decoding()`` scope an entry is checked only once.
    """

    def __init__(self) -> None:
        self._entries: dict[object, tuple[tuple, object, object]] = {}  # name -> (key, copy, scope checked in)

    def get(self, name: object, sources: Callable[[], tuple[torch.Tensor, ...]], build: Callable[[], T]) -> T | None:
        scope = _DECODING_SCOPE.get()
        entry = self._entries.get(name)
        if entry is not None and scope is not None and entry[2] is scope:
            return entry[1]
        key = tuple(_weight_key(w) for w in sources())
        if None in key:
            return None
        copy = entry[1] if entry is not None and entry[0] == key else build()
        self._entries[name] = (key, copy, scope)
        return copy

    def clear(self) -> None:
        self._entries.clear()

    def tensor_bytes(self) -> int:
        """Bytes of the tensors the copies hold (themselves, or their attributes or items one level down)."""
        total = 0
        for _, copy, _ in self._entries.values():
            parts = copy if isinstance(copy, (tuple, list)) else getattr(copy, "__dict__", {}).values()
            for part in (copy,) if isinstance(copy, torch.Tensor) else parts:
                if isinstance(part, torch.Tensor):
                    total += part.numel() * part.element_size()
        return total


# ----------------------------------------------------------------------------- the model

_DECODERS: weakref.WeakKeyDictionary[Transformer, FastDecoder] = weakref.WeakKeyDictionary()


def transposed_products_pay(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether x @ W^T with W^T stored contiguously is at least as fast as F.linear(x, W) for a few rows.

    On CPU it is for fp32 (MKL: 1.2x faster for one row of a small head), but bf16 products
    with a transposed weight run 2.5x slower and fp16 ones up to 100x slower than F.linear's.
    """
    return device.type != "cpu" or dtype == torch.float32


def rows_cost_alike(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a product of a few rows (up to ~16) with a large weight costs about what one row does.

    Then verification unembeds all its rows in one product instead of row by row up to the
    first rejection. True on GPUs, and for bf16 on CPU, where such products are bound by reading
    the weight (5 rows cost what 1 does); fp32 and fp16 products of a few rows on CPU cost
    about a row's arithmetic each (5 rows: 3-10x one row), so reading the head again per row is cheaper.
    """
    return device.type != "cpu" or dtype == torch.bfloat16


def weight_bytes(model: Transformer) -> int:
    """Bytes of the model's parameters (a tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def layout_of(model: Transformer) -> str:
    """FOLDED (decoding copies) or IN_PLACE (the model's own weights): see the module docstring."""
    weight = model.embed_tokens.weight
    if not transposed_products_pay(weight.dtype, weight.device) or weight_bytes(model) > COPY_LIMIT_BYTES:
        return IN_PLACE
    return FOLDED


@dataclass(frozen=True)
class NativeExits:
    """A DEE policy as ``kernels.f32_decode`` reads it (``FastDecoder.exit_policy``)."""

    struct: kernels.F32Exits
    logits: torch.Tensor  # (N,): where each early exit's logits are written
    ids: torch.Tensor | None  # the check head's token ids (None: the full vocabulary)


class FastDecoder:
    """A model's blocks and heads for decoding: its results up to rounding, no dropout, no gradients.

    ``FastDecoder.of(model)`` is the model's own, kept as long as the model, so the copies it
    derives outlive each generation.
    """

    @classmethod
    def of(cls, model: Transformer) -> FastDecoder:
        fast = _DECODERS.get(model)
        if fast is None:
            fast = _DECODERS[model] = cls(model)
        return fast

    def __init__(self, model: Transformer) -> None:
        self._model = weakref.ref(model)  # the model keeps its decoder alive (see `of`), not the reverse
        self.copies = DerivedWeights()  # the blocks' and the head's, and strategies' own (propagation)
        self._short_heads = DerivedWeights()
        self._ranked_by = model.token_counts  # the counts the short heads' tokens were chosen by
        self._layout = DerivedWeights()  # the layout, decided again when the weights change (dtype, device)
        self._last_layout: str | None = None

    @property
    def model(self) -> Transformer:
        return self._model()

    @property
    def layout(self) -> str:
        """FOLDED or IN_PLACE (``layout_of``), decided again when the embedding or head weights change
        (dtype, device); a change of layout drops the other layout's copies. The copies read it
        when they are built, so COPY_LIMIT_BYTES applies from a model's next weight change."""
        def sources() -> tuple[torch.Tensor, ...]:
            model = self.model
            return model.embed_tokens.weight, model.lm_head.weight

        layout = self._layout.get("layout", sources, lambda: layout_of(self.model)) or layout_of(self.model)
        if layout != self._last_layout:
            self.copies.clear()
            self._last_layout = layout
        return layout

    def copy_bytes(self) -> int:
        """Bytes held by the decoding copies (blocks, head, short heads, strategies' own)."""
        return self.copies.tensor_bytes() + self._short_heads.tensor_bytes()

    def block(self, layer: int) -> FastBlock | InPlaceBlock:
        """Block `layer` for decoding (a FastBlock, or an InPlaceBlock), rebuilt whenever a weight changes."""
        def build() -> FastBlock | InPlaceBlock:
            block = self.model.layers[layer]
            return FastBlock.of(block) if self.layout == FOLDED else InPlaceBlock(block)

        return (self.copies.get(("block", layer), lambda: block_weights(self.model.layers[layer]), build)
                or build())

    def run_blocks(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        *,
        cache: KVCache | None = None,
        pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``Transformer.run_blocks`` through FastBlocks (or InPlaceBlocks); in one ``kernels.f32_decode`` call
        where it runs."""
        cos, sin = rope if rope is not None else self.model.rotary(pos, h.shape[1])
        native = self.native() if cache is not None else None
        if kernels.runs_decode(native, cache, h.shape[1], h):
            cache.reserve_layers(range(start, end), pos, h.shape[1])
            x = h.reshape(h.shape[1], h.shape[2]).clone(memory_format=torch.contiguous_format)  # written in place
            kernels.f32_decode(native, start, end, None, x, cache, pos)
            return x.view(h.shape)
        for layer in range(start, end):
            h = self.block(layer)(h, cos, sin, cache, layer, pos)
        return h

    def native(self) -> kernels.NativeModel | None:
        """The whole model for ``kernels.f32_decode`` (float32 folded blocks on a CPU with the kernels), or None."""
        def sources() -> tuple[torch.Tensor, ...]:
            model = self.model
            return (*(w for layer in model.layers for w in block_weights(layer)), model.embed_tokens.weight,
                    model.rope_cos, model.rope_sin)

        def build() -> kernels.NativeModel | None:
            model = self.model
            if self.layout != FOLDED or not kernels.available():
                return None
            blocks = [self.block(layer) for layer in range(model.num_layers)]
            return kernels.native_model([b.native for b in blocks], model.embed_tokens.weight.detach(),
                                        model.rope_cos, model.rope_sin, model.norm.eps, keep=tuple(blocks))

        return self.copies.get("native", sources, build) if kernels.ENABLED else None

    def step(self, tokens: torch.Tensor, pos: int, cache: KVCache, end: int | None = None,
             vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One token (1, 1) at position pos through blocks [0, end) (default: all) and the head (the short head of
        `vocab` tokens, if given) -> (hidden (1, 1, C), logits (N,), the short head's ids or None).

        One ``kernels.f32_decode`` call where it runs: the embedding, every block and the head.
        """
        model = self.model
        end = model.num_layers if end is None else end
        native = self.native()
        head, ids = self.head_for(vocab)
        if head is None or not kernels.runs_decode(native, cache, 1):
            h = self.run_blocks(model.embed_tokens(tokens), 0, end, cache=cache, pos=pos)
            if vocab is None:
                return h, self.unembed(h).view(-1), None
            logits, ids = self.unembed_short(h, vocab)
            return h, logits.view(-1), ids
        _, hidden, logits = self._native_step(native, tokens, pos, cache, end, head)
        return hidden, logits, ids

    def exit_policy(self, thresholds: list[float], vocab: int | None, measure: str,
                    classifier: Any = None) -> NativeExits | None:
        """DEE's policy for ``exit_step`` (thresholds of layers 1..L-1, math.inf where unchecked; early exits, and
        the softmax and margin checks, through the short head of `vocab` tokens, or the full head; measure
        classifier: with its ExitClassifier), or None where the kernel cannot run it."""
        native = self.native()
        head, ids = self.head_for(vocab)
        if native is None or head is None or measure not in kernels.DECODE_MEASURES:
            return None
        networks = None
        if classifier is not None:
            checked = [layer for layer, t in enumerate(thresholds, start=1) if math.isfinite(t)]
            layers = {layer: classifier.kernel_layer(self.model, layer) for layer in checked}
            short = min(classifier.vocab, self.model.config.vocab_size)
            networks = kernels.classifier_policy(layers, self.model.num_layers, short,
                                                 reuse=classifier.heads_exits(vocab))
        struct, logits = kernels.exit_policy(thresholds, head, measure, networks)
        return NativeExits(struct, logits, ids)

    def exit_step(self, tokens: torch.Tensor, pos: int, cache: KVCache, policy: NativeExits,
                  phase_ns: torch.Tensor | None = None) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None] | None:
        """DEE's step for one token (1, 1) in one kernel call -> (exit layer, hidden (1, 1, C), exit logits (N,),
        their ids (None: the full vocabulary)); the skipped layers' keys and values propagated (CALM). None
        where the kernel cannot run (the caller runs the blocks one at a time). phase_ns: see
        ``kernels.f32_decode``."""
        native = self.native()
        head, _ = self.head_for(None)
        if head is None or not kernels.runs_decode(native, cache, 1):
            return None
        # every layer's cache gets the token: by its block or by propagation
        ran, hidden, logits = self._native_step(native, tokens, pos, cache, native.num_layers, head, policy, phase_ns)
        if ran == native.num_layers:
            return ran, hidden, logits, None
        return ran, hidden, policy.logits.clone(), policy.ids

    def _native_step(self, native: kernels.NativeModel, tokens: torch.Tensor, pos: int, cache: KVCache, end: int,
                     head: torch.Tensor, policy: NativeExits | None = None,
                     phase_ns: torch.Tensor | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """One token through ``kernels.f32_decode`` over layers [0, end) -> (blocks run, hidden (1, 1, C), the head's
        logits (unwritten after an early exit)); the cache's layers [0, end) marked written first."""
        self.model.rotary(pos, 1)  # refuses a position beyond the context, as the torch path does
        cache.reserve_layers(range(end), pos, 1)
        x, logits = torch.empty(1, native.channels), torch.empty(head.shape[1])
        ran = kernels.f32_decode(native, 0, end, tokens, x, cache, pos, exits=None if policy is None else policy.struct,
                                 head=head, logits=logits, phase_ns=phase_ns)
        return ran, x.view(1, 1, -1), logits

    def head_for(self, vocab: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the folded (C, N) head of the full vocabulary (vocab None) or of the `vocab` most frequent tokens,
        their ids (None: all)); the head is None where there is no such copy (in place, or untracked)."""
        model = self.model
        if vocab is None or vocab >= model.config.vocab_size:
            head = self.copies.get("head", self._head_weights, self._build_head)
            ids = None if vocab is None else torch.arange(model.config.vocab_size)
        else:
            ids, head, transposed = self._short_head(vocab)
            head = head if transposed else None
        return (head if isinstance(head, torch.Tensor) else None), ids

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Transformer.unembed``; with the folded layout a few rows on CPU go through the head's transposed copy.

        Decoding unembeds one row (or k + 1) at a time, and on CPU (MKL) x @ W^T with W^T stored
        contiguously is faster than F.linear(x, W) for a few rows of a small fp32 head.
        """
        model = self.model
        if hidden.device.type == "cpu" and hidden.numel() <= FEW_ROWS * hidden.shape[-1]:
            head = self.copies.get("head", self._head_weights, self._build_head)
            if isinstance(head, torch.Tensor):  # not IN_PLACE, and not untracked (None)
                if kernels.unembeds(hidden, head):  # the head of f32_decode's steps: the same bits
                    return kernels.f32_unembed(hidden, head, model.norm.eps)
                return normalize(hidden, model.norm.eps) @ head
        return kernels.linear(rms_norm(model.norm, hidden), model.lm_head.weight)

    def unembed_short(self, hidden: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``Transformer.unembed_short`` through a cached copy of the short head (size / V of the head)."""
        model = self.model
        if size >= model.config.vocab_size:
            return self.unembed(hidden), torch.arange(model.config.vocab_size, device=hidden.device)
        ids, head, transposed = self._short_head(size)
        if transposed and kernels.unembeds(hidden, head):  # the head of f32_decode's steps: the same bits
            return kernels.f32_unembed(hidden, head, model.norm.eps), ids
        x = normalize(hidden, model.norm.eps)
        return (x @ head if transposed else kernels.linear(x, head)), ids

    def _short_head(self, size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(ids, the folded short head, whether it is stored (C, N) rather than (N, C)), cached."""
        model = self.model
        if model.token_counts is not self._ranked_by:  # new counts choose other tokens
            self._short_heads.clear()
            self._ranked_by = model.token_counts

        def build() -> tuple[torch.Tensor, torch.Tensor, bool]:
            ids = model.frequent_ids(size)
            weight = model.lm_head.weight
            transposed = transposed_products_pay(weight.dtype, weight.device)
            with torch.no_grad():
                head = model.folded_head(ids)  # (C, N), a view of the (N, C) rows
                return ids, (head.contiguous() if transposed else head.t().contiguous()), transposed

        return self._short_heads.get(size, self._head_weights, build) or build()

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        return model.lm_head.weight, model.norm.weight

    def _build_head(self) -> torch.Tensor | str:
        """The head's folded transposed copy, or IN_PLACE (no copy) for that layout."""
        if self.layout != FOLDED:
            return IN_PLACE
        with torch.no_grad():
            return self.model.folded_head().contiguous()
