"""Where a batch-1 decoding step's time goes, and what that leaves early exit to save.

``measure_step_costs`` times, on the decoding fast path as the strategies run it and with the
pieces interleaved so drift hits all alike, each piece of one token's step at a mid-context
position:

- ``ar_step``: the whole autoregressive step (embed, every block, the full head, argmax),
  as the Autoregressive strategy runs it;
- ``block``: one block;
- ``full_head``: the final norm + full LM head (and its argmax, where it is a call of its own);
- ``check``: one DEE confidence check, the softmax maximum through the exit head (the short
  head of ``check_vocab`` tokens, or the full head);
- ``propagate``: CALM propagation of one exited token's K/V to the layers it skipped;
- ``classifier_check`` (not in PIECES; None unless ``classifier_vocab`` is given): one check
  of the learned exit classifier (measure ``classifier``): its features through a short head
  of ``classifier_vocab`` tokens and its MLP (``classifier_hidden`` units; 0: logistic regression);
- ``rest``: ``ar_step`` minus L blocks minus the head (embedding, argmax, dispatch).

Where DEE's whole step is one kernel call (float32 on a CPU with layerskip's kernels), the
block, the head, the check (the classifier's too) and propagation are timed inside that call
(``kernels.f32_decode``'s phase clock), in DEE steps that check every layer without exiting
or exit at the middle layer; elsewhere each is a call of its own, as DEE runs it there.

``dee_estimate`` turns those costs and an exit histogram into DEE's expected time per
token: a token exiting after block l < L runs l blocks, a check at every checked layer up
to l and propagation; a token reaching the last layer runs every block, every check and
the full head. The same with free checks is the most any cheaper confidence measure could
give at that exit histogram. Where the estimate matches the measured speed-up, the cost
model explains it. ``exit_share_needed`` runs it backwards: the share of tokens that must
exit at each layer for a target speed-up.

``measure_ssd_costs`` times the pieces of one self-speculative round (a draft step, the tail,
verification's blocks over k + 1 rows, the verifier's head), and ``ssd_estimate`` turns them
into SSD's speed-up over AR at an acceptance rate (accepted / drafted, as the LayerSkip paper
and ``layerskip bench`` count it): the round's arithmetic, without the strategy's bookkeeping.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from layerskip import kernels
from layerskip.decoding.dee import checked_exit
from layerskip.decoding.propagation import FusedPropagation
from layerskip.device import synchronize
from layerskip.errors import ConfigError
from layerskip.fastpath import FastDecoder, decoding, rows_cost_alike
from layerskip.model import Transformer

PIECES = ("ar_step", "block", "full_head", "check", "propagate", "rest")


@dataclass
class StepCosts:
    """Median microseconds of each piece of one token's decoding step (see the module docstring)."""

    ar_step: float
    block: float
    full_head: float
    check: float
    propagate: float
    rest: float
    num_layers: int
    position: int
    check_vocab: int | None  # tokens in the exit head the check reads; None: the full head
    repeats: int
    threads: int
    classifier_check: float | None = None  # one learned-classifier check (measure "classifier")
    classifier_vocab: int | None = None  # tokens in the short head its features read

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeeEstimate:
    us_per_token: float
    us_per_token_free_checks: float
    speedup: float  # over ar_step
    speedup_free_checks: float
    mean_exit_layer: float


def time_pieces(pieces: dict[object, Callable[[], object]], repeats: int, device: torch.device) -> dict[object, float]:
    """Median microseconds of each piece (named by any key), interleaved, the device synchronised around each."""
    samples: dict[object, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, run in pieces.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


@decoding()
def measure_step_costs(model: Transformer, *, check_vocab: int | None = 1024, position: int = 64,
                       repeats: int = 300, classifier_vocab: int | None = None,
                       classifier_hidden: int | None = None) -> StepCosts:
    """Time each piece of one token's step at `position` (a random prompt fills the cache before it).

    classifier_vocab: also time a learned-classifier check whose features read a short head of
    that many tokens (its network: ``classifier_hidden`` units, 0: logistic regression; None:
    calibrate's default).
    """
    num_layers, max_len = model.num_layers, model.config.max_seq_len
    if not (isinstance(position, int) and 1 <= position < max_len):
        raise ConfigError(f"the position must be in 1..{max_len - 1} (the model's context is {max_len}), got {position!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if model.training:
        raise ValueError("measuring decoding costs needs the model in eval mode; call model.eval() first")
    device = model.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, position), generator=generator).to(device)
    fast = FastDecoder.of(model)
    cache = model.new_cache(max_len=position + 1)  # not the whole context: 128k positions of a Llama 3 take GBs
    fast.run_blocks(model.embed(prompt), 0, num_layers, cache=cache, pos=0)
    token = prompt[:, -1:]
    hidden = fast.run_blocks(model.embed(token), 0, num_layers, cache=cache, pos=position)
    propagate = FusedPropagation.for_model(model)
    middle = num_layers // 2

    def ar_step() -> int:  # the Autoregressive strategy's loop body
        return int(fast.step(token, position, cache)[1].argmax())

    if classifier_vocab is not None and classifier_hidden is None:
        from layerskip.calibration.classifier import DEFAULT_HIDDEN

        classifier_hidden = DEFAULT_HIDDEN
    classifier = None if classifier_vocab is None else _zero_classifier(
        hidden.shape[-1], classifier_vocab, classifier_hidden, range(1, num_layers))
    phases = _kernel_phases(fast, token, position, cache, check_vocab, middle, classifier)
    if phases is None:  # torch's calls: DEE runs each block, check and propagation as calls of their own
        rope = model.rotary(position, 1)
        pieces = {
            "ar_step": ar_step,
            "block": lambda: fast.run_blocks(hidden, middle, middle + 1, cache=cache, pos=position, rope=rope),
            "full_head": lambda: int(fast.unembed(hidden)[0, -1].argmax()),
            "check": lambda: checked_exit(fast, hidden, check_vocab, "softmax", {"full": 0, "short": 0})[1],
            "propagate": lambda: propagate(model, hidden, middle, position, cache),
        }
    else:
        pieces = {"ar_step": ar_step, **phases.pieces}
    if classifier is not None and phases is None:  # else timed inside the kernel call, with the phases
        pieces["classifier_check"] = _classifier_check(fast, classifier, hidden, middle)
    for run in pieces.values():  # warm-up: derived weights, the allocator
        run()
    us = time_pieces(pieces, repeats, device)
    if phases is not None:
        us = {name: value for name, value in us.items() if name not in phases.pieces} | phases.medians()
    us["rest"] = us["ar_step"] - num_layers * us["block"] - us["full_head"]
    return StepCosts(**us, num_layers=num_layers, position=position, check_vocab=check_vocab, repeats=repeats,
                     threads=torch.get_num_threads(), classifier_vocab=classifier_vocab)


class _KernelPhases:
    """DEE's step as one kernel call, timed inside the kernel (``kernels.f32_decode``'s phase_ns): a step
    checking every layer and never exiting gives a block, a check and the head; one exiting at `layer`
    gives propagation. Timing a piece alone would find caches warm that a whole step does not."""

    def __init__(self, fast: FastDecoder, token: torch.Tensor, position: int, cache, never, exits,
                 classifier_never=None) -> None:
        self.samples: dict[str, list[float]] = {"block": [], "check": [], "full_head": [], "propagate": []}
        num_layers = fast.model.num_layers

        def run(policy, record) -> None:
            phase_ns = torch.zeros(len(kernels.PHASES), dtype=torch.float64)
            fast.exit_step(token, position, cache, policy, phase_ns=phase_ns)
            record(dict(zip(kernels.PHASES, (phase_ns / 1e3).tolist())))

        def full(us: dict[str, float]) -> None:
            self.samples["block"].append(us["blocks"] / num_layers)
            self.samples["check"].append(us["checks"] / (num_layers - 1))
            self.samples["full_head"].append(us["head"])

        self.pieces = {"checked_step": lambda: run(never, full),
                       "exiting_step": lambda: run(exits, lambda us: self.samples["propagate"].append(
                           us["propagation"]))}
        if classifier_never is not None:  # a learned-classifier check at every layer, never exiting
            self.samples["classifier_check"] = []
            self.pieces["classifier_step"] = lambda: run(classifier_never, lambda us: self.samples[
                "classifier_check"].append(us["checks"] / (num_layers - 1)))

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}


def _kernel_phases(fast: FastDecoder, token: torch.Tensor, position: int, cache, vocab: int | None,
                   layer: int, classifier=None) -> _KernelPhases | None:
    """The in-kernel timings of DEE's one-call step (softmax checks through `vocab`; and the checks of
    `classifier`, when given), or None where DEE runs the blocks one call at a time."""
    num_layers = fast.model.num_layers
    never = fast.exit_policy([2.0] * (num_layers - 1), vocab, "softmax")  # a probability never reaches 2
    exits = fast.exit_policy([0.0 if checked == layer else math.inf for checked in range(1, num_layers)], vocab,
                             "softmax")
    if never is None or exits is None or fast.exit_step(token, position, cache, never) is None:
        return None
    classifier_never = None if classifier is None else fast.exit_policy(
        [2.0] * (num_layers - 1), classifier.vocab, "classifier", classifier)
    return _KernelPhases(fast, token, position, cache, never, exits, classifier_never)


def _zero_classifier(width: int, vocab: int, units: int, layers: Iterable[int]):
    """A learned exit classifier of calibrate's shape with zero weights: a check's cost does not depend on them."""
    from layerskip.decoding.measures import ExitClassifier

    shapes = [(1, width + 2)] if units == 0 else [(units, width + 2), (1, units)]
    return ExitClassifier(vocab=vocab, layers={layer: [(torch.zeros(shape), torch.zeros(shape[0])) for shape in shapes]
                                               for layer in layers})


def _classifier_check(fast: FastDecoder, classifier, hidden: torch.Tensor, layer: int) -> Callable[[], float]:
    """One learned-classifier check at `layer` as DynamicEarlyExit runs it in torch (a call of its own)."""
    prev = hidden.clone()
    return lambda: classifier.confidence(fast, hidden, prev, layer)[0].item()


def token_cost(costs: StepCosts, exit_layer: int, checked_layers: Sequence[int], *, free_checks: bool = False) -> float:
    """Estimated microseconds of one token exiting after block `exit_layer` (1..L).

    Propagation is charged at its measured cost whatever the exit layer: it is one product
    for any number of skipped layers, whose size barely matters at this scale.
    """
    early = exit_layer < costs.num_layers
    base = costs.rest + exit_layer * costs.block + (costs.propagate if early else costs.full_head)
    checks = 0 if free_checks else sum(1 for c in checked_layers if c <= exit_layer)
    return base + checks * costs.check


def _checked(costs: StepCosts, checked_layers: Sequence[int] | None) -> list[int]:
    return sorted(set(range(1, costs.num_layers) if checked_layers is None else checked_layers))


def dee_estimate(costs: StepCosts, exit_counts: Sequence[int], checked_layers: Sequence[int] | None = None) -> DeeEstimate:
    """DEE's expected microseconds per token for an exit histogram (tokens exiting after block 1..L).

    checked_layers: where DEE checks its confidence (default every layer but the last).
    """
    num_layers = costs.num_layers
    if len(exit_counts) != num_layers or any(c < 0 for c in exit_counts) or not sum(exit_counts):
        raise ConfigError(f"an exit histogram needs {num_layers} non-negative counts (tokens exiting after block "
                          f"1..{num_layers}) with a positive sum, got {list(exit_counts)!r}")
    checked = _checked(costs, checked_layers)
    total = sum(exit_counts)
    with_checks = sum(c * token_cost(costs, layer, checked) for layer, c in enumerate(exit_counts, start=1)) / total
    free_checks = sum(c * token_cost(costs, layer, checked, free_checks=True)
                      for layer, c in enumerate(exit_counts, start=1)) / total
    mean_exit = sum(layer * c for layer, c in enumerate(exit_counts, start=1)) / total
    return DeeEstimate(us_per_token=with_checks, us_per_token_free_checks=free_checks,
                       speedup=costs.ar_step / with_checks, speedup_free_checks=costs.ar_step / free_checks,
                       mean_exit_layer=mean_exit)


def exit_share_needed(costs: StepCosts, target_speedup: float, checked_layers: Sequence[int] | None = None,
                      *, free_checks: bool = False) -> dict[int, float | None]:
    """For each early exit layer l, the smallest share of tokens that must exit there for DEE to
    reach `target_speedup` over AR, the other tokens running the whole model (and every check).

    None where even every token exiting at l would not reach the target. It turns a speed-up
    target into a question a calibrated exit histogram answers at a glance.
    """
    if not (isinstance(target_speedup, (int, float)) and target_speedup > 0):
        raise ConfigError(f"the target speed-up must be a positive number, got {target_speedup!r}")
    checked = _checked(costs, checked_layers)
    budget = costs.ar_step / target_speedup  # microseconds per token the target allows
    full = token_cost(costs, costs.num_layers, checked, free_checks=free_checks)
    needed: dict[int, float | None] = {}
    for layer in range(1, costs.num_layers):
        early = token_cost(costs, layer, checked, free_checks=free_checks)
        if full <= budget:
            needed[layer] = 0.0
        elif early >= budget:
            needed[layer] = None
        else:  # share * early + (1 - share) * full = budget
            needed[layer] = (full - budget) / (full - early)
    return needed


# ----------------------------------------------------------------------------- self-speculative decoding


@dataclass
class SsdCosts:
    """Median microseconds of the pieces of one self-speculative round (see ``ssd_estimate``)."""

    ar_step: float  # one autoregressive step, as in StepCosts
    draft_step: float  # blocks [0, E) on one token + the draft head (short or full) + argmax
    tail: float  # blocks [0, E) on one token, no head
    verify_blocks: float  # blocks [E, L) on k + 1 rows
    head_rows: float  # the full head on k + 1 rows in one product, argmax per row
    head_row: float  # the full head on one row, argmax
    batched_head: bool  # whether verification unembeds its rows in one product (fastpath.rows_cost_alike)
    draft_layer: int
    k: int
    draft_vocab: int | None
    position: int
    repeats: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def ssd_estimate(costs: SsdCosts, acceptance: float) -> float:
    """SSD's speed-up over AR when a share `acceptance` of the drafted tokens is accepted.

    A round drafts k tokens (k draft steps and the tail), verifies k + 1 rows, and commits the
    accepted drafts plus one token of the full model: acceptance * k + 1 tokens on average.
    Row by row, the verifier's head reads as many rows as it commits tokens.
    """
    if not (isinstance(acceptance, (int, float)) and 0 <= acceptance <= 1):
        raise ConfigError(f"an acceptance rate is in [0, 1] (accepted / drafted), got {acceptance!r}")
    tokens = acceptance * costs.k + 1
    head = costs.head_rows if costs.batched_head else tokens * costs.head_row
    round_us = costs.k * costs.draft_step + costs.tail + costs.verify_blocks + head
    return costs.ar_step * tokens / round_us


@decoding()
def measure_ssd_costs(model: Transformer, draft_layer: int, ks: Sequence[int] = (4,), *,
                      draft_vocabs: Sequence[int | None] = (None,), position: int = 64,
                      repeats: int = 30) -> dict[tuple[int, int | None], SsdCosts]:
    """Time the pieces of SSD rounds (draft layer E, each k in ks, each draft head) at `position`.

    Every piece is timed in one interleaved loop, the pieces rounds share (the AR step, the
    tail, one head row) once, so all the estimates rest on the same samples. Returns
    (k, draft_vocab) -> SsdCosts; draft_vocab None is the full head.
    """
    num_layers, k_max = model.num_layers, max(ks)
    if not (isinstance(draft_layer, int) and 1 <= draft_layer < num_layers):
        raise ConfigError(f"the draft layer must be in 1..{num_layers - 1}, got {draft_layer!r}")
    if not (isinstance(position, int) and 1 <= position and position + k_max + 1 <= model.config.max_seq_len):
        raise ConfigError(f"position + k + 1 must fit the model's context of {model.config.max_seq_len}")
    device = model.embed_tokens.weight.device
    prompt = torch.randint(model.config.vocab_size, (1, position + k_max + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    fast, e = FastDecoder.of(model), draft_layer
    cache = model.new_cache(max_len=position + k_max + 1)
    fast.run_blocks(model.embed(prompt[:, :position]), 0, num_layers, cache=cache, pos=0)
    token = prompt[:, position : position + 1]  # (1, 1)
    drafted = fast.run_blocks(model.embed(prompt[:, position:]), 0, e, cache=cache, pos=position)  # (1, k_max + 1, C)
    verified = fast.run_blocks(drafted, e, num_layers, cache=cache, pos=position)

    def run(start: int, end: int, h: torch.Tensor) -> torch.Tensor:
        return fast.run_blocks(h, start, end, cache=cache, pos=position)

    def draft_step(vocab: int | None) -> Callable[[], int]:
        def step() -> int:
            h = run(0, e, model.embed(token))
            return int((fast.unembed(h) if vocab is None else fast.unembed_short(h, vocab)[0])[0, -1].argmax())
        return step

    pieces: dict[object, Callable[[], object]] = {
        "ar_step": lambda: int(fast.unembed(run(0, num_layers, model.embed(token)))[0, -1].argmax()),
        "tail": lambda: run(0, e, model.embed(token)),
        "head_row": lambda: int(fast.unembed(verified[:, :1])[0, -1].argmax()),
        **{("draft_step", vocab): draft_step(vocab) for vocab in draft_vocabs},
        **{("verify_blocks", k): (lambda k=k: run(e, num_layers, drafted[:, : k + 1])) for k in ks},
        **{("head_rows", k): (lambda k=k: fast.unembed(verified[:, : k + 1]).argmax(-1).tolist()) for k in ks},
    }
    for piece in pieces.values():  # warm-up: derived weights, the allocator
        piece()
    us = time_pieces(pieces, repeats, device)
    batched, threads = rows_cost_alike(verified.dtype, device), torch.get_num_threads()
    return {(k, vocab): SsdCosts(ar_step=us["ar_step"], draft_step=us["draft_step", vocab], tail=us["tail"],
                                 verify_blocks=us["verify_blocks", k], head_rows=us["head_rows", k],
                                 head_row=us["head_row"], batched_head=batched, draft_layer=e, k=k,
                                 draft_vocab=vocab, position=position, repeats=repeats, threads=threads)
            for k in ks for vocab in draft_vocabs}
