"""Self-speculative decoding: the first E blocks draft, the full model verifies, one KV cache.

One round, with n the position of the newest committed token (not yet in the cache):

1. Draft: for i = 0, 1, ..., run blocks [0, E) on the token at position n + i, writing
   their keys/values into the shared cache, unembed through the shared head and propose
   the next token. With ``draft_vocab=N`` the draft unembeds through the short head (the
   shared head's rows of the N most frequent tokens, ``Transformer.unembed_short``): a
   small model's head costs several blocks, and a draft only needs a likely token. Keep
   every exit hidden state. Drafting stops after ``k`` tokens, at an
   end-of-sequence draft, when only one more token fits, or (adaptive) when the draft's top
   probability falls below ``adaptive_threshold`` (that draft is dropped; its input's exit
   hidden state is kept).
2. The last draft token still needs blocks [0, E) (the *tail*: no head), unless the round
   ended on a dropped draft or an end-of-sequence draft. The tail is what lets a round whose
   drafts are all accepted add a bonus token from the full model; ``bonus=False`` skips it
   (cheaper rounds when whole drafts are rarely accepted).
   With ``max_backoff`` > 0, rounds that gain nothing from drafting are followed by plain
   full-model steps (1, 2, 4, ... rounds, see ``Backoff``).
3. Verify: ONE ``run_blocks(kept_hidden, E, L)`` over all those positions, reusing the
   draft's work in [0, E) (never recomputed); the full model's logits at positions
   n .. n + m come from the shared head: in one product where a few rows cost what one does
   (GPUs, bf16 on CPU), else row by row, only up to the first rejection (see ``RowLogits``).
   Drafts and verification run the model's fast path (``layerskip.fastpath``).
4. Accept the longest prefix of drafts the full model agrees with (greedy: equal to its
   argmax; sampling: speculative rejection sampling, accept with probability min(1, p/q),
   else resample from normalize(max(p - q, 0))), then add one token from the full model (the
   correction, or the bonus after an all-accepted draft), and roll the cache back to the
   committed tokens with ``cache.truncate``.

Greedy output is token-for-token the greedy autoregressive output; sampled output follows
the full model's distribution exactly (the draft only changes the speed).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from layerskip.cache import KVCache
from layerskip.decoding.base import (
    Decoding,
    GenerationResult,
    OnTokens,
    SamplingConfig,
    prefill,
    sample_token,
    sampling_probs,
    token_buffer,
)
from layerskip.errors import ConfigError
from layerskip.fastpath import FastDecoder, decoding, rows_cost_alike
from layerskip.model import Transformer


@dataclass
class Draft:
    """What one drafting pass leaves for the verifier."""

    tokens: list[int]  # proposed tokens d_1 .. d_m
    probs: list[torch.Tensor]  # q_i (V,) each, only when sampling
    hidden: torch.Tensor  # (1, T, C) exit hidden states after E blocks, positions n .. n+T-1, T in {m, m+1}


@dataclass
class Verdict:
    """The outcome of verifying one draft."""

    tokens: list[int]  # accepted drafts, then the full model's token (if any)
    accepted: int  # how many drafts were accepted


@dataclass
class SpecStats:
    """Acceptance counters over one generation."""

    k: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    histogram: list[int] | None = None  # rounds by number of accepted drafts, index 0..k

    def __post_init__(self) -> None:
        self.histogram = [0] * (self.k + 1)

    def add(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.histogram[accepted] += 1

    def as_dict(self, new_tokens: int) -> dict:
        return {
            "rounds": self.rounds,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted_length": self.accepted / self.rounds if self.rounds else 0.0,
            "tokens_per_round": new_tokens / self.rounds if self.rounds else 0.0,
            "accepted_length_histogram": list(self.histogram),
        }


class Backoff:
    """Exponential back-off from drafting after rounds that gain nothing from it.

    After a drafting round with no accepted draft (rejected, or nothing confident enough to
    propose), the next 1, 2, 4, ... up to ``limit`` rounds are plain full-model steps with
    no draft, so a stretch the draft cannot predict costs little more than autoregressive
    decoding; any accepted draft resets it. The decision depends only on the past, so greedy
    output and the sampled distribution are unchanged. ``limit`` 0 turns it off.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.wait, self.skip, self.plain_steps = limit, 1, 0, 0

    def draft_now(self) -> bool:
        if self.skip:
            self.skip -= 1
            self.plain_steps += 1
            return False
        return True

    def update(self, gained: bool) -> None:
        if not self.limit:
            return
        if gained:
            self.wait = 1
        else:
            self.skip, self.wait = self.wait, min(2 * self.wait, self.limit)


class SelfSpeculative:
    """Draft with blocks [0, draft_layer) + the shared head, verify with the rest."""

    name = "ssd"

    def __init__(
        self,
        draft_layer: int,
        k: int = 4,
        *,
        adaptive_threshold: float | None = None,
        bonus: bool = True,
        max_backoff: int = 0,
        draft_vocab: int | None = None,
    ) -> None:
        if not (isinstance(draft_layer, int) and draft_layer >= 1):
            raise ConfigError(f"draft_layer must be an integer >= 1 (blocks the draft runs), got {draft_layer!r}")
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"k (tokens drafted per round) must be an integer >= 1, got {k!r}")
        t = adaptive_threshold
        if t is not None and not (isinstance(t, (int, float)) and 0 < t < 1):
            raise ConfigError(f"adaptive_threshold must be in (0, 1) (or None for a fixed k), got {t!r}")
        if not (isinstance(max_backoff, int) and max_backoff >= 0):
            raise ConfigError(f"max_backoff must be an integer >= 0 (0: off), got {max_backoff!r}")
        self.draft_layer, self.k, self.adaptive_threshold, self.bonus = draft_layer, k, t, bool(bonus)
        if draft_vocab is not None and not (isinstance(draft_vocab, int) and draft_vocab >= 1):
            raise ConfigError(f"draft_vocab must be an integer >= 1 (tokens the draft head holds; None: all), "
                              f"got {draft_vocab!r}")
        self.max_backoff, self.draft_vocab = max_backoff, draft_vocab
        self.lazy_head = True  # unembed verified rows one at a time where rows cost each their own (RowLogits)

    def __repr__(self) -> str:
        return (f"SelfSpeculative(draft_layer={self.draft_layer}, k={self.k}, "
                f"adaptive_threshold={self.adaptive_threshold}, bonus={self.bonus}, max_backoff={self.max_backoff}, "
                f"draft_vocab={self.draft_vocab})")

    @decoding()
    def generate(
        self,
        model: Transformer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        stop_ids: Collection[int] = (),
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
    ) -> GenerationResult:
        if self.draft_layer >= model.num_layers:
            raise ConfigError(
                f"draft_layer must be in 1..{model.num_layers - 1} for this {model.num_layers}-layer model, "
                f"got {self.draft_layer}"
            )
        run = Decoding.begin(model, prompt_ids, max_new_tokens, stop_ids, on_tokens)
        fast = FastDecoder.of(model)
        buf = token_buffer(model, prompt_ids, run.budget)
        cache = model.new_cache(max_len=len(prompt_ids) + run.budget)
        if len(prompt_ids) > 1:  # everything but the newest token goes in the cache
            prefill(fast, buf[:, : len(prompt_ids) - 1], cache)
        stats, token_info, backoff = SpecStats(self.k), [], Backoff(self.max_backoff)
        while run.stop_reason is None:
            n = len(prompt_ids) - 1 + len(run.tokens)  # position of the newest token
            max_drafts = min(self.k, run.remaining - 1) if backoff.draft_now() else 0
            draft = self.draft(fast, buf, n, cache, max_drafts, sampling, run.stop_ids, generator)
            verdict = self.verify(fast, draft, n, cache, sampling, generator)
            if max_drafts:
                backoff.update(verdict.accepted > 0)
            kept = run.commit(verdict.tokens)
            buf[0, n + 1 : n + 1 + kept] = torch.as_tensor(verdict.tokens[:kept])
            cache.truncate(n + kept)  # the newest committed token is not in the cache
            stats.add(len(draft.tokens), verdict.accepted)
            token_info += [{"accepted": i < verdict.accepted} for i in range(kept)]
        summary = {"draft_layer": self.draft_layer, "k": self.k, "adaptive_threshold": self.adaptive_threshold,
                   "bonus": self.bonus, "max_backoff": self.max_backoff, "draft_vocab": self.draft_vocab,
                   "plain_steps": backoff.plain_steps}
        return run.result(self.name, {**summary, **stats.as_dict(len(run.tokens))}, token_info)

    def draft(
        self,
        fast: FastDecoder,
        buf: torch.Tensor,  # (1, S) tokens; drafts are written after position n
        n: int,
        cache: KVCache,
        max_drafts: int,
        sampling: SamplingConfig,
        stop_ids: frozenset[int],
        generator: torch.Generator | None,
    ) -> Draft:
        """Propose up to max_drafts tokens with blocks [0, E), keeping their exit hidden states."""
        embed, run_blocks, e = fast.model.embed_tokens, fast.run_blocks, self.draft_layer
        hidden: list[torch.Tensor] = []
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(max_drafts):
            # blocks [0, E) and the draft head: (1, 1, C), (V,) or the short head's (N,) and its ids
            h, logits, ids = fast.step(buf[:, n + i : n + i + 1], n + i, cache, end=e, vocab=self.draft_vocab)
            hidden.append(h)
            token, q = self.propose(logits, sampling, generator)
            if token is None:  # not confident: drop it; this input's hidden state is already kept
                return Draft(tokens, probs, torch.cat(hidden, dim=1))
            if ids is not None:  # back from the short head's columns to token ids
                token = int(ids[token])
                if q is not None:  # the draft's distribution over the whole vocabulary
                    q = torch.zeros(fast.model.config.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, ids, q)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            buf[0, n + i + 1] = token
            if token in stop_ids:  # nothing to verify after it, and no bonus token needed
                return Draft(tokens, probs, torch.cat(hidden, dim=1))
        m = len(tokens)  # the tail: the last draft (or the newest token) through [0, E), no head
        if m and not self.bonus:  # without it an all-accepted round earns no bonus token, but costs less
            return Draft(tokens, probs, torch.cat(hidden, dim=1))
        hidden.append(run_blocks(embed(buf[:, n + m : n + m + 1]), 0, e, cache=cache, pos=n + m))
        return Draft(tokens, probs, torch.cat(hidden, dim=1))

    def propose(
        self, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[int | None, torch.Tensor | None]:
        """The draft's token for logits (V,) and its distribution q (None when greedy); None if unsure."""
        threshold = self.adaptive_threshold
        if sampling.greedy:
            if threshold is not None:
                top, lse = logits.max(), torch.logsumexp(logits.float(), dim=-1)
                if float(torch.exp(top.float() - lse)) < threshold:
                    return None, None
            return int(logits.argmax()), None
        q = sampling_probs(logits, sampling)
        if threshold is not None and float(q.max()) < threshold:
            return None, None
        return sample_token(q, generator), q

    def verify(
        self,
        fast: FastDecoder,
        draft: Draft,
        n: int,
        cache: KVCache,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        """One pass of blocks [E, L) over the kept hidden states; accept a prefix + one full-model token.

        Row j of the verified positions predicts the token after position n + j. Rows are
        unembedded only up to the first rejected draft (see ``RowLogits``).
        """
        h = fast.run_blocks(draft.hidden, self.draft_layer, fast.model.num_layers, cache=cache, pos=n)
        rows = RowLogits(fast, h, lazy=self.lazy_head and not rows_cost_alike(h.dtype, h.device))
        drafts = draft.tokens
        for j in range(h.shape[1]):
            logits = rows[j]  # (V,)
            if sampling.greedy:
                target = int(logits.argmax())
                if j < len(drafts) and drafts[j] == target:
                    continue
                return Verdict(drafts[:j] + [target], j)  # the correction, or the bonus token
            p = sampling_probs(logits, sampling)
            if j == len(drafts):  # every draft accepted: the bonus token
                return Verdict(drafts + [sample_token(p, generator)], j)
            token, q = drafts[j], draft.probs[j]
            u = float(torch.rand((), generator=generator, device=p.device))
            if u * float(q[token]) < float(p[token]):  # accept with probability min(1, p/q)
                continue
            residual = (p - q).clamp_min_(0.0)
            if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct
                residual = p
            return Verdict(drafts[:j] + [sample_token(residual / residual.sum(), generator)], j)
        return Verdict(list(drafts), len(drafts))  # all accepted and no tail (EOS draft, or bonus=False)


class RowLogits:
    """The full model's logits of verified rows, on demand: ``rows[j]`` is (V,).

    lazy: unembed one row at a time when first asked for, so rows after a rejected draft are
    never unembedded: for CPU products in fp32 or fp16, whose cost grows with the rows (a
    row's arithmetic costs more than reading the head). Otherwise (GPUs, bf16 on CPU: reading
    the head costs more, and a few rows cost what one does) all rows in one product, which
    reads the head once instead of once per row. Both costs grow with the head's size alike,
    so the choice depends on the kernel (``fastpath.rows_cost_alike``), not on the size.
    """

    def __init__(self, fast: FastDecoder, h: torch.Tensor, *, lazy: bool) -> None:
        self.fast, self.h = fast, h  # h: (1, T, C)
        self.all = None if lazy else fast.unembed(h)[0]  # (T, V)

    def __getitem__(self, j: int) -> torch.Tensor:
        if self.all is not None:
            return self.all[j]
        return self.fast.unembed(self.h[:, j : j + 1])[0, -1]
