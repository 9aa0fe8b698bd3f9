"""Dynamic early exit (DEE): each new token leaves at the first layer confident enough.

Policy. For every new token the blocks run one at a time. After block l (``exit_layer=l``,
"after l blocks") for a *checked* layer l, a confidence in [0, 1] (``measures.py``) is
computed and the token exits when it reaches that layer's threshold lambda_l; after the
last block L the token always exits. The exit's hidden state goes through the one shared
final norm + LM head (``unembed``), and the next token is the argmax (greedy) or a sample
drawn through ``sampling_probs`` (temperature / top-k / top-p) from those exit logits.

Checked layers are l = min_exit_layer, min_exit_layer + check_every, ... below L whose
threshold is finite; an infinite threshold (``None`` in a thresholds file) means "never
exit here" and costs nothing. Thresholds above 1 are unreachable, so the output is the
full model's; threshold 0 exits every token at min_exit_layer. A check through the head
(``softmax``, ``margin``) costs a head evaluation (vocabulary x d_model), which
``stats["head_evals_per_token"]`` shows. The ``classifier`` measure (CALM's learned exit
classifier, ``measures.ExitClassifier``) needs the weights a calibration fits, so it comes
only from a thresholds file; each of its checks reads a short head of ``classifier.vocab``
tokens (counted in ``short_head_evals_per_token``), reused as the exit's logits when
``exit_vocab`` is the same size.

Short exit head (``exit_vocab=N``). A small model's shared head can read as many weights as
several blocks, so an early exit that still pays the whole head saves little. With
``exit_vocab`` the checks and the early exits use the short head (the shared head's rows of
the N most frequent tokens, ``Transformer.unembed_short``): the confidence is measured over
those N tokens and an early-exiting token is one of them. A token that reaches the last
layer uses the full head. Calibration runs this exact policy, so its guarantee covers the
restriction.

Skipped layers' keys and values: CALM-style propagation (``propagation.py``), right after a
token exits, so every layer's cache holds every position after each step; counted in
``stats["kv_projections_per_token"]``.

Prompt handling. The prompt except its last token is prefilled through all L blocks
(exact K/V); the last prompt token then goes through the same per-token exit loop as
every generated token, so every new token, the first included, has an exit layer and
follows the same rule.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from layerskip.cache import KVCache
from layerskip.config import check_measure
from layerskip.decoding.base import (
    Decoding,
    GenerationResult,
    OnTokens,
    SamplingConfig,
    pick,
    prefill,
    token_buffer,
)
from layerskip.decoding.measures import ExitClassifier, logit_confidence, saturation_confidence
from layerskip.decoding.propagation import FusedPropagation, propagate_kv
from layerskip.errors import ConfigError
from layerskip.fastpath import FastDecoder, NativeExits, decoding
from layerskip.model import Transformer

NEEDS_CLASSIFIER = ("the classifier measure reads exit-classifier weights that only a calibration fits: run "
                    "`layerskip calibrate --measure classifier` and pass its file (--thresholds FILE); a global "
                    "--conf cannot use this measure")

Propagate = Callable[[Transformer, torch.Tensor, int, int, KVCache], int]  # propagate_kv's signature


@dataclass
class StepResult:
    """What feeding one token did: its exit logits and layer, and the work it took."""

    logits: torch.Tensor  # (V,) exit logits of the token fed at this step (-inf outside a short head)
    exit_layer: int
    head_evals: int  # full-head evaluations
    kv_projections: int
    short_head_evals: int = 0


class DynamicEarlyExit:
    """The DEE strategy; see the module docstring for the policy and the cache handling.

    thresholds: one global threshold for layers 1..L-1, or a sequence of L-1 per-layer
        thresholds (index 0 is layer 1); ``math.inf`` (or None) means never exit there.
    """

    name = "dee"

    def __init__(
        self,
        thresholds: float | Sequence[float | None],
        measure: str = "softmax",
        min_exit_layer: int = 1,
        check_every: int = 1,
        exit_vocab: int | None = None,
        classifier: ExitClassifier | None = None,
    ) -> None:
        self.measure = check_measure(measure)
        check_policy(min_exit_layer, check_every, exit_vocab)
        self.exit_vocab = exit_vocab
        self.min_exit_layer = min_exit_layer
        self.check_every = check_every
        if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
            self.thresholds: float | list[float] = _check_threshold(thresholds, "the threshold")
        else:
            self.thresholds = [
                _check_threshold(math.inf if t is None else t, f"threshold {i + 1}") for i, t in enumerate(thresholds)
            ]
        if (measure == "classifier") != (classifier is not None):
            raise ConfigError(NEEDS_CLASSIFIER if classifier is None else
                              f"exit classifier weights were given with the {measure!r} measure; they belong to "
                              "measure 'classifier'")
        self.classifier = classifier

    def layer_thresholds(self, num_layers: int) -> list[float]:
        """Thresholds of layers 1..L-1 (index l-1), whatever form they were given in."""
        if isinstance(self.thresholds, float):
            return [self.thresholds] * (num_layers - 1)
        if len(self.thresholds) != num_layers - 1:
            raise ConfigError(
                f"{len(self.thresholds)} per-layer thresholds were given but the model has {num_layers} "
                f"layers; give {num_layers - 1} (layers 1..{num_layers - 1}; the last layer always exits)"
            )
        return list(self.thresholds)

    def checked_layers(self, num_layers: int) -> dict[int, float]:
        """Layer -> threshold for every layer where an exit is possible (never the last)."""
        check_policy(self.min_exit_layer, self.check_every, self.exit_vocab, num_layers)
        lams = self.layer_thresholds(num_layers)
        return {
            layer: lams[layer - 1]
            for layer in range(self.min_exit_layer, num_layers, self.check_every)
            if math.isfinite(lams[layer - 1])
        }

    def check_model(self, model: Transformer) -> dict[int, float]:
        """The checked layers for `model`, refusing a classifier made for another width or missing a checked layer."""
        checks = self.checked_layers(model.num_layers)
        if self.classifier is not None:
            self.classifier.check_model(model, sorted(checks))
        return checks

    def step(self, fast: FastDecoder, token: torch.Tensor, pos: int, cache: KVCache, checks: dict[int, float],
             propagate: Propagate = propagate_kv) -> StepResult:
        """Feed one token (1, 1) at position pos; exit, fill the skipped layers' K/V with `propagate`."""
        model = fast.model
        num_layers = model.num_layers
        h = model.embed(token)  # (1, 1, C)
        rope = model.rotary(pos, 1)
        exit_layer, counts = num_layers, {"full": 0, "short": 0}
        checked = None  # (logits, ids) of the last checked layer
        for layer in range(1, num_layers + 1):
            prev, h = h, fast.run_blocks(h, layer - 1, layer, cache=cache, pos=pos, rope=rope)
            threshold = checks.get(layer)
            if threshold is None:
                continue
            if self.measure == "saturation":
                checked, conf = None, saturation_confidence(h, prev)
            elif self.classifier is not None:
                conf, short = self.classifier.confidence(fast, h, prev, layer)
                counts["short"] += 1
                checked = short if self.classifier.heads_exits(self.exit_vocab) else None  # the exit head's own logits
            else:
                checked, conf = self.checked_exit(fast, h, counts)
            if float(conf) >= threshold:
                exit_layer = layer
                break
        if exit_layer == num_layers:
            logits, counts["full"] = fast.unembed(h).reshape(-1), counts["full"] + 1
        else:
            logits, ids = checked if checked is not None else self.exit_head(fast, h, counts)
            logits = whole_vocabulary(logits.reshape(-1), ids, model.config.vocab_size)
        kv = propagate(model, h, exit_layer, pos, cache) if exit_layer < num_layers else 0
        return StepResult(logits=logits, exit_layer=exit_layer, head_evals=counts["full"], kv_projections=kv,
                          short_head_evals=counts["short"])

    def native_policy(self, fast: FastDecoder, checks: dict[int, float]) -> NativeExits | None:
        """This policy for ``native_step``, or None where the kernel cannot run it (another dtype, layout)."""
        layers = fast.model.num_layers
        thresholds = [checks.get(layer, math.inf) for layer in range(1, layers)]
        return fast.exit_policy(thresholds, self.exit_vocab, self.measure, self.classifier)

    def native_step(self, fast: FastDecoder, token: torch.Tensor, pos: int, cache: KVCache, checks: dict[int, float],
                    policy: NativeExits) -> StepResult | None:
        """``step`` in one kernel call (``FastDecoder.exit_step``): the same policy, the same blocks and
        checks, the propagated keys and values up to float rounding; None where the kernel cannot run."""
        done = fast.exit_step(token, pos, cache, policy)
        if done is None:
            return None
        exit_layer, _, logits, ids = done
        num_layers = fast.model.num_layers
        early = exit_layer < num_layers
        checked = sum(1 for layer in checks if layer <= exit_layer)
        # the exit head is read at every check (softmax, margin), or at the exit alone (saturation; the
        # classifier, unless its own short head is the exit head), and the classifier's at its checks
        if self.classifier is not None:
            heads, classifier_heads = int(early and not self.classifier.heads_exits(self.exit_vocab)), checked
        else:
            heads, classifier_heads = (checked if self.measure != "saturation" else int(early)), 0
        full = int(not early) + (heads if self.exit_vocab is None else 0)
        logits = whole_vocabulary(logits, ids, fast.model.config.vocab_size)
        return StepResult(logits=logits, exit_layer=exit_layer, head_evals=full,
                          kv_projections=num_layers - exit_layer,
                          short_head_evals=classifier_heads + (0 if self.exit_vocab is None else heads))

    def checked_exit(self, fast: FastDecoder, h: torch.Tensor,
                     counts: dict[str, int]) -> tuple[tuple[torch.Tensor, torch.Tensor | None], float]:
        """((logits, ids), confidence) of an exit at hidden state h (module function ``checked_exit``)."""
        return checked_exit(fast, h, self.exit_vocab, self.measure, counts)

    def exit_head(self, decoder: FastDecoder | Transformer, h: torch.Tensor,
                  counts: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Early-exit logits of h: the full head's (..., V) and None, or the short head's (..., N) and their ids.

        decoder: the model's FastDecoder while decoding, or the model itself (the plain path).
        """
        return exit_head(decoder, h, self.exit_vocab, counts)

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
        cache: KVCache | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens; `cache` (empty) may be passed in to inspect it afterwards."""
        run = Decoding.begin(model, prompt_ids, max_new_tokens, stop_ids, on_tokens)
        checks = self.check_model(model)
        fast = FastDecoder.of(model)
        propagate = FusedPropagation.for_model(model)
        if cache is None:
            cache = model.new_cache(max_len=len(prompt_ids) + run.budget)
        elif any(cache.lengths):
            raise ValueError("DynamicEarlyExit.generate needs an empty cache")
        buf = token_buffer(model, prompt_ids, run.budget)
        pos = len(prompt_ids) - 1  # the newest token's: it goes through the exit loop like every new one
        if pos:
            prefill(fast, buf[:, :pos], cache)  # exact K/V for the rest of the prompt
        native = self.native_policy(fast, checks)
        steps: list[StepResult] = []
        while run.stop_reason is None:
            token_ids = buf[:, pos : pos + 1]
            step = ((native is not None and self.native_step(fast, token_ids, pos, cache, checks, native))
                    or self.step(fast, token_ids, pos, cache, checks, propagate))
            token = pick(step.logits, sampling, generator)
            steps.append(step)
            run.commit((token,))
            pos += 1
            buf[0, pos] = token
        result = run.result(self.name, token_info=[{"exit_layer": s.exit_layer} for s in steps])
        result.stats = self.stats(steps, model.num_layers, checks, result.tokens_per_second)
        return result

    def stats(self, steps: list[StepResult], num_layers: int, checks: dict[int, float],
              tokens_per_second: float) -> dict:
        """The policy and what it did: exit layers, and blocks, head evaluations and K/V projections per token."""
        exits = [s.exit_layer for s in steps]
        count = max(len(exits), 1)
        return {
            "measure": self.measure,
            "num_layers": num_layers,
            "min_exit_layer": self.min_exit_layer,
            "check_every": self.check_every,
            "checked_layers": sorted(checks),
            "thresholds": [None if not math.isfinite(t) else t for t in self.layer_thresholds(num_layers)],
            "exit_layers": exits,
            "exit_histogram": {layer: exits.count(layer) for layer in range(1, num_layers + 1)},
            "mean_exit_layer": sum(exits) / count,
            # Decode blocks per token (the prompt prefill is not counted): a token exiting
            # after block l ran exactly l blocks.
            "blocks_per_token": sum(exits) / count,
            "head_evals_per_token": sum(s.head_evals for s in steps) / count,
            "exit_vocab": self.exit_vocab,
            "classifier_vocab": None if self.classifier is None else self.classifier.vocab,
            "short_head_evals_per_token": sum(s.short_head_evals for s in steps) / count,
            "kv_projections_per_token": sum(s.kv_projections for s in steps) / count,
            "tokens_per_second": tokens_per_second,
        }


def exit_head(decoder: FastDecoder | Transformer, h: torch.Tensor, exit_vocab: int | None,
              counts: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Early-exit logits of h through the full head ((..., V), None) or the short head of exit_vocab tokens
    ((..., N), their ids); counts["full"] or counts["short"] goes up by one."""
    if exit_vocab is None:
        counts["full"] += 1
        return decoder.unembed(h), None
    counts["short"] += 1
    return decoder.unembed_short(h, exit_vocab)


def whole_vocabulary(logits: torch.Tensor, ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Exit logits (N,) of the short head's tokens `ids` as logits over the whole vocabulary, -inf elsewhere
    (ids None: already the whole vocabulary)."""
    if ids is None:
        return logits
    return logits.new_full((vocab_size,), -math.inf).index_copy_(0, ids, logits)


def checked_exit(fast: FastDecoder, h: torch.Tensor, exit_vocab: int | None, measure: str,
                 counts: dict[str, int]) -> tuple[tuple[torch.Tensor, torch.Tensor | None], float]:
    """((logits, ids), confidence) of an exit at hidden state h: ``exit_head`` then ``logit_confidence``. DEE's
    check where its step runs layer by layer (inside ``native_step``'s kernel call otherwise), and what costs.py
    times there."""
    checked = exit_head(fast, h, exit_vocab, counts)
    return checked, logit_confidence(checked[0], measure).item()


def check_policy(min_exit_layer: int, check_every: int, exit_vocab: int | None, num_layers: int | None = None) -> None:
    """The policy settings besides thresholds and measure (for a model of num_layers, when given), or a
    ConfigError naming the bad one."""
    if exit_vocab is not None and not (isinstance(exit_vocab, int) and not isinstance(exit_vocab, bool)
                                       and exit_vocab >= 2):
        raise ConfigError(f"exit_vocab must be an integer >= 2 (tokens the short exit head holds; None: the "
                          f"full head), got {exit_vocab!r}")
    if not (isinstance(min_exit_layer, int) and min_exit_layer >= 1):
        raise ConfigError(f"min_exit_layer must be an integer >= 1, got {min_exit_layer!r}")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ConfigError(f"check_every must be an integer >= 1, got {check_every!r}")
    if num_layers is not None and min_exit_layer > num_layers:
        raise ConfigError(f"min_exit_layer {min_exit_layer} is beyond the model's {num_layers} layers")


def _check_threshold(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ConfigError(
            f"{what} must be a number >= 0 (confidences lie in [0, 1]; above 1 means never exit), got {value!r}"
        )
    return float(value)
