"""Which layers a DEE policy checks: the ones whose checks save more than they cost.

A check at layer l costs every token that reaches l; it saves, for the tokens that exit
there, the blocks after l and the full head. Where few tokens exit at a layer, its check
costs more than it saves: on a small model at delta = 1%, checks at the middle layers
can eat all that the first layer's exits gain. So, on the learn half only, calibration
drops checks one layer at a time (backward elimination) while the policy's expected cost
per token falls, each candidate set judged at its own family's last member whose learn-half
disagreement is at most delta. The test half then runs Learn-then-Test on the chosen set's
family as before, so the guarantee is unchanged; only the family is narrower.

Costs are in units of one block's weights read, since a batch-1 decoding step is bound by
reading weights (``weight_costs``); a measured check cost (``layerskip bench``'s
"where a step's time goes") can replace the check's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerskip.calibration.exits import policy_disagreements
from layerskip.calibration.scores import ExitScores
from layerskip.errors import ConfigError

if TYPE_CHECKING:
    from layerskip.model import Transformer

SELECTIONS = ("cost", "all")


@dataclass(frozen=True)
class CheckCosts:
    """A decoding step's pieces in units of one block: what choosing the checked layers weighs."""

    check: float  # one confidence check
    exit_head: float  # an early exit's head where the check did not read it, else 0
    full_head: float  # the final norm and full head, for a token that reaches the last layer
    propagate: float  # CALM propagation of one skipped layer's keys and values

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def token_costs(self, exits: np.ndarray, thresholds: Sequence[float], num_layers: int) -> np.ndarray:
        """Each token's cost (blocks) exiting after block exits[i] under these thresholds (inf: unchecked)."""
        checked = np.array([layer for layer, lam in enumerate(thresholds, start=1) if math.isfinite(lam)])
        checks = (checked[None, :] <= exits[:, None]).sum(1) if checked.size else np.zeros_like(exits)
        early = exits < num_layers
        return (exits + self.check * checks
                + np.where(early, self.exit_head + self.propagate * (num_layers - exits), self.full_head))


def weight_costs(model: Transformer, measure: str, exit_vocab: int | None, classifier_vocab: int | None = None,
                 classifier_hidden: int = 0, check_cost: float | None = None) -> CheckCosts:
    """The pieces' weights read, over one block's: the exit head's rows for a softmax or margin check, the
    classifier's short head and network for the classifier, a cosine (nothing) for saturation; an exit
    reads the exit head again unless the check did (softmax, margin, a classifier whose short head it is).
    check_cost: a measured check cost in blocks, replacing the estimate."""
    block = sum(p.numel() for p in model.layers[0].parameters())
    width = model.config.d_model
    head_rows = model.config.vocab_size if exit_vocab is None else min(exit_vocab, model.config.vocab_size)
    if measure == "classifier":
        check = ((classifier_vocab or head_rows) * width + classifier_hidden * (width + 3)) / block
    elif measure == "saturation":
        check = 0.0
    else:
        check = head_rows * width / block
    cfg = model.config
    return CheckCosts(
        check=check if check_cost is None else float(check_cost),
        exit_head=0.0 if measure in ("softmax", "margin") or exit_vocab == classifier_vocab
        else head_rows * width / block,
        full_head=cfg.vocab_size * width / block,
        propagate=2 * width * cfg.kv_heads * cfg.head_dim / block,
    )


def check_selection(selection: str, check_cost: float | None) -> None:
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown layer selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if check_cost is not None and not (isinstance(check_cost, (int, float)) and 0 <= check_cost < math.inf):
        raise ConfigError(f"the check cost is in blocks and must be a number >= 0, got {check_cost!r}")


def learn_half_cost(learn: ExitScores, family: list[list[float]], delta: float, costs: CheckCosts) -> float:
    """Mean cost per learn-half token of the family's last member, in order, whose learn-half disagreement is
    at most delta (the member Learn-then-Test would reach if the halves agreed); no such member: every
    token runs the whole model, unchecked."""
    chosen: list[float] = [math.inf] * (learn.num_layers - 1)
    for member in family:
        wrong, _ = policy_disagreements(learn, member)
        if wrong > delta * learn.num_tokens:
            break
        chosen = member
    _, exits = policy_disagreements(learn, chosen)
    return float(costs.token_costs(exits, chosen, learn.num_layers).mean())


def select_layers(learn: ExitScores, checked: list[bool], family_of: Callable[[list[bool]], list[list[float]]],
                  delta: float, costs: CheckCosts) -> tuple[list[bool], dict]:
    """Backward elimination on the learn half: drop the check whose removal lowers the expected cost most,
    while one does. Returns the checked layers kept and a record of the choice (costs per token, in blocks)."""
    kept = list(checked)
    cost = learn_half_cost(learn, family_of(kept), delta, costs)
    start = cost
    while any(kept):
        trials = {}
        for row in [r for r, c in enumerate(kept) if c]:
            trial = [c and r != row for r, c in enumerate(kept)]
            trials[row] = learn_half_cost(learn, family_of(trial), delta, costs)
        row = min(trials, key=trials.__getitem__)
        if trials[row] >= cost:
            break
        kept[row], cost = False, trials[row]
    return kept, {
        "selection": "cost", "costs_in_blocks": costs.to_dict(),
        "allowed_layers": [r + 1 for r, c in enumerate(checked) if c],
        "selected_layers": [r + 1 for r, c in enumerate(kept) if c],
        "learn_half_cost_per_token": {"allowed": start, "selected": cost},
    }
