"""Calibrate dynamic-early-exit thresholds with a finite-sample risk guarantee -> thresholds.json.

In the spirit of CALM (Schuster et al., 2022), with Learn-then-Test (Angelopoulos et al.,
2021) and fixed-sequence testing.

**Risk.** The risk of thresholds lambda = (lambda_1 .. lambda_{L-1}) is the per-token
*teacher-forced* disagreement of the whole exit policy with the full model:

    R(lambda) = P[ top-1 of the exit DEE picks for a token != top-1 of the last layer ]

where the token's context is real text and every earlier position has the full model's
K/V. One forward pass with all exits over validation windows gives, for every token and
every layer l, the confidence c_l and whether exit l's top-1 equals the final top-1, so the
policy's disagreement for any lambda is a cheap count. DEE's own generations differ from
this (their prefix is DEE's output and the skipped layers hold propagated K/V), so the
disagreement on generated text is also *measured* and written to the file; it is a
measurement, not covered by the guarantee.

**Global risk, per-layer thresholds.** The risk is controlled for the whole exit policy,
never layer by layer, so delta is not split across layers. The calibration windows are
split at random (seeded) into a *learn* half and a *test* half. From the learn half only, a
one-parameter family of whole policies lambda(t) is built, ordered from the most
conservative member to the least:

- ``per-layer``: lambda_l(t) is the lowest confidence at which exit l's disagreement
  *at that confidence* (an isotonic fit of disagreement against falling c_l on the learn
  half) is still <= t; t runs over 0, then 400 geometric steps from 1e-5 to 1. Layers whose
  confidence means less get higher thresholds.
- ``global``: one shared threshold on every checked layer, descending over a grid (0..1 in
  steps of 0.005 plus quantiles of the learn half's confidences).
- ``auto`` (default): whichever of the two has the lower learn-half mean exit layer,
  averaged over fixed risk levels 0.5%..20%. The choice uses the learn half only and does
  not depend on delta.

Every lambda_l(t) is non-increasing along the family, and the family does not depend on
delta.

**Learn-then-Test with fixed-sequence testing.** On the other, *test* half (disjoint
windows; n tokens), for each family member in order, count its disagreements k and compute
the binomial-tail p-value of the null hypothesis "R > delta":

    p = P[ Binomial(n, delta) <= k ]

Reject (declare the member valid) when p <= epsilon and move on to the next, less
conservative member; stop at the first member that is not rejected. Testing the nulls in an
order fixed before looking at the test half controls the family-wise error rate at epsilon
without any correction, so the chosen member, the last one rejected, satisfies:

    **Guarantee.** If the test-half tokens and the tokens DEE is used on are independent
    draws from the same distribution, then with probability at least 1 - epsilon over the
    test half, R(lambda_hat) <= delta.

**The learned exit classifier** (measure ``classifier``, CALM's early-exit classifier): the
confidence is a small classifier's predicted probability that exit l agrees with the last
layer. It is fit (``classifier``) on the learn half only, before the family is built, and
then scores both halves; the test half is only ever scored, never fit on, so the classifier
is part of the calibrated policy and the guarantee below covers it unchanged. Its weights
are written into thresholds.json.

When no member is rejected, every threshold is infinite (``null`` in the file): DEE is the
full model and R = 0. Caveats (also in the file): tokens of running text are not
independent, so the effective sample size is smaller than n; the risk is about the greedy
top-1 under teacher forcing; the guarantee holds for the exact policy that was calibrated
(measure, min_exit_layer, check_every, thresholds), so changing any of them voids it.
With every allowed layer checked (``select_layers="all"``), thresholds are monotone in
delta: a smaller delta gives larger p-values, an earlier stop and so thresholds that are
the same or higher on every layer.

**Which layers are checked** (``selection``; ``select_layers="cost"``, the default). A check
costs every token that reaches its layer and saves, for the tokens exiting there, the later
blocks and the full head; where few tokens exit, it costs more than it saves. Before the
test half is read, backward elimination on the learn half drops checks while the chosen
family member's expected cost per token (at learn-half disagreement <= delta) falls; the
family on the layers kept then goes to Learn-then-Test as above. The choice depends on
delta, so a larger delta may check other layers.

The modules, in the order the data flows: ``scores`` (the torch pass), ``classifier`` (fitting
the exit classifier), ``stats`` (binomial tail, fixed-sequence test, isotonic fits; numpy
only), ``exits`` (one policy's exits and disagreements), ``selection`` (which layers to
check, by cost), ``policy`` (families and the Learn-then-Test choice), ``generated`` (DEE on
its own text), ``record`` (the file's contents) and ``pipeline`` (``calibrate_checkpoint``
and ``evaluate_thresholds``, which the CLI calls). ``layerskip.thresholds`` reads the file back.
"""

from layerskip.calibration.classifier import classifier_scores, fit_classifier
from layerskip.calibration.exits import head_evals, policy_disagreements, policy_exit_layers
from layerskip.calibration.generated import generated_disagreement
from layerskip.calibration.pipeline import calibrate_checkpoint, evaluate_thresholds
from layerskip.calibration.policy import (
    AUTO_RISK_LEVELS,
    METHODS,
    Calibration,
    auto_method,
    calibrate_scores,
    check_method,
    global_family,
    learn_half_exit_layers,
    per_layer_family,
    per_layer_grid,
    split_scores,
)
from layerskip.calibration.record import (
    RISK_DEFINITION,
    guarantee_text,
    thresholds_record,
    write_json_atomic,
)
from layerskip.calibration.scores import ExitScores, exit_scores
from layerskip.calibration.selection import SELECTIONS, CheckCosts, select_layers, weight_costs
from layerskip.calibration.stats import (
    FixedSequenceResult,
    binomial_cdf,
    binomial_pvalue,
    fixed_sequence_test,
    isotonic_increasing,
    local_error_curve,
)

__all__ = [
    "AUTO_RISK_LEVELS", "METHODS", "RISK_DEFINITION", "SELECTIONS", "Calibration", "CheckCosts", "ExitScores",
    "FixedSequenceResult",
    "auto_method", "binomial_cdf", "binomial_pvalue", "calibrate_checkpoint", "calibrate_scores", "check_method",
    "classifier_scores", "fit_classifier",
    "evaluate_thresholds", "exit_scores", "fixed_sequence_test", "generated_disagreement", "global_family",
    "guarantee_text", "head_evals", "isotonic_increasing", "learn_half_exit_layers", "local_error_curve",
    "per_layer_family", "per_layer_grid", "policy_disagreements", "policy_exit_layers", "select_layers",
    "split_scores", "thresholds_record", "weight_costs", "write_json_atomic",
]
