"""The thresholds file (thresholds.json) that `layerskip calibrate` writes and DEE reads.

Reading it needs no calibration code: ``load_thresholds`` checks the file against the model
(layer count, measure, fingerprint of the weights) and returns the exit policy it holds. A
file for the ``classifier`` measure also holds the exit classifier's weights (its
"classifier" entry, ``measures.ExitClassifier.to_record``); they are part of the policy, so
such a file must name the model it was fit for, and a malformed or missing entry is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from layerskip.config import MEASURE_RANGE, MEASURES
from layerskip.errors import ConfigError

if TYPE_CHECKING:
    from layerskip.decoding.dee import DynamicEarlyExit
    from layerskip.decoding.measures import ExitClassifier

FORMAT = "layerskip-thresholds"
VERSION = 1


def checked_mask(num_layers: int, min_exit_layer: int, check_every: int) -> list[bool]:
    """Which of layers 1..L-1 the DEE policy looks at (as DynamicEarlyExit.checked_layers)."""
    return [layer >= min_exit_layer and (layer - min_exit_layer) % check_every == 0 for layer in range(1, num_layers)]


def check_risk_settings(delta: float, epsilon: float) -> None:
    for name, value in (("delta", delta), ("epsilon", epsilon)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ConfigError(f"{name} must be in (0, 1), got {value!r}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of the weights' names, shapes and fp32 values."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    counts = getattr(model, "token_counts", None)
    if counts is not None:  # they choose the short head's tokens, so they are part of the policy
        h.update(b"token_counts")
        h.update(counts.cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Thresholds:
    """A loaded thresholds file, ready for DynamicEarlyExit."""

    thresholds: list[float]  # layers 1..L-1; inf: never exit
    measure: str
    num_layers: int
    min_exit_layer: int
    check_every: int
    delta: float | None
    epsilon: float | None
    record: dict[str, Any]  # the whole file
    path: Path | None  # None: a record that was never written
    exit_vocab: int | None = None
    classifier: ExitClassifier | None = None  # measure "classifier": its weights, from the file

    def strategy(self, *, min_exit_layer: int | None = None, check_every: int | None = None,
                 exit_vocab: int | None = None) -> DynamicEarlyExit:
        """DEE with this policy; a setting given here replaces the calibrated one (voiding the guarantee)."""
        from layerskip.decoding.dee import DynamicEarlyExit

        return DynamicEarlyExit(
            self.thresholds, self.measure,
            self.min_exit_layer if min_exit_layer is None else min_exit_layer,
            self.check_every if check_every is None else check_every,
            exit_vocab=self.exit_vocab if exit_vocab is None else exit_vocab, classifier=self.classifier)

    # A sequence of the per-layer thresholds, so ``list(load_thresholds(...))`` works. Layers
    # a calibration did not check are already inf, so these alone reproduce the policy.
    def __iter__(self):
        return iter(self.thresholds)

    def __len__(self) -> int:
        return len(self.thresholds)

    def __getitem__(self, index: int) -> float:
        return self.thresholds[index]


def load_thresholds(path: str | Path, num_layers: int, measure: str | None = None,
                    fingerprint: str | None = None) -> Thresholds:
    """Read a thresholds file, refusing anything malformed or made for another model/measure."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"thresholds file {path} does not exist; create it with `layerskip calibrate`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"thresholds file {path}: not valid JSON ({exc})") from None
    return thresholds_from_record(record, num_layers, measure, fingerprint, path=path)


def thresholds_from_record(record: Any, num_layers: int, measure: str | None = None,
                           fingerprint: str | None = None, *, path: Path | None = None) -> Thresholds:
    """The policy in a thresholds record (a file's parsed JSON), checked as load_thresholds checks a file."""

    def bad(message: str) -> ConfigError:
        return ConfigError(f"thresholds file {path}: {message}" if path is not None else f"thresholds: {message}")

    if not isinstance(record, dict):
        raise bad("must hold a JSON object with 'measure', 'num_layers' and 'thresholds'")
    if record.get("format", FORMAT) != FORMAT:
        raise bad(f"format is {record.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("measure", "num_layers", "thresholds") if k not in record]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    file_measure = record["measure"]
    if file_measure not in MEASURES:
        raise bad(f"unknown measure {file_measure!r}; expected one of {', '.join(MEASURES)}")
    if measure is not None and measure != file_measure:
        raise bad(f"was calibrated for the {file_measure!r} measure, not {measure!r}; "
                  f"use --measure {file_measure} or calibrate again")
    if record["num_layers"] != num_layers:
        raise bad(f"was made for a {record['num_layers']}-layer model, but this model has {num_layers} layers")
    values = record["thresholds"]
    if not isinstance(values, list) or len(values) != num_layers - 1:
        raise bad(f"'thresholds' must be a list of {num_layers - 1} entries (layers 1..{num_layers - 1}), "
                  f"got {len(values) if isinstance(values, list) else type(values).__name__}")
    thresholds = [_threshold(layer, value, file_measure, bad) for layer, value in enumerate(values, start=1)]
    file_fp = (record.get("model") or {}).get("fingerprint")
    if fingerprint is not None and file_fp is not None and file_fp != fingerprint:
        raise bad(f"was calibrated for another model (fingerprint {file_fp}, this one is {fingerprint}); "
                  "its guarantee does not carry over: run `layerskip calibrate` on this checkpoint")
    from layerskip.decoding.dee import check_policy

    try:
        settings = {k: record.get(k, 1) for k in ("min_exit_layer", "check_every")}
        check_policy(**settings, exit_vocab=record.get("exit_vocab"))
        for k in ("delta", "epsilon"):
            if record.get(k) is not None:
                check_risk_settings(record[k], 0.5) if k == "delta" else check_risk_settings(0.5, record[k])
    except ConfigError as exc:
        raise bad(str(exc)) from None
    # The policy is (thresholds, min_exit_layer, check_every): layers it never checks get inf.
    checked = checked_mask(num_layers, settings["min_exit_layer"], settings["check_every"])
    thresholds = [t if c else math.inf for t, c in zip(thresholds, checked)]
    classifier = _classifier(record, thresholds, num_layers, bad)
    return Thresholds(thresholds=thresholds, measure=file_measure, num_layers=num_layers,
                      min_exit_layer=settings["min_exit_layer"], check_every=settings["check_every"],
                      delta=record.get("delta"), epsilon=record.get("epsilon"), record=record, path=path,
                      exit_vocab=record.get("exit_vocab"), classifier=classifier)


def _classifier(record: dict[str, Any], thresholds: list[float], num_layers: int,
                bad: Callable[[str], ConfigError]) -> ExitClassifier | None:
    """The exit classifier of a "classifier" record (None for other measures, which must not hold one)."""
    from layerskip.decoding.measures import ExitClassifier

    if record["measure"] != "classifier":
        if "classifier" in record:
            raise bad(f"holds exit classifier weights, but its measure is {record['measure']!r}")
        return None
    if "classifier" not in record:
        raise bad("measure 'classifier' but no classifier weights ('classifier' entry); calibrate again with "
                  "`layerskip calibrate --measure classifier`")
    if not (record.get("model") or {}).get("fingerprint"):
        raise bad("holds exit classifier weights but no model fingerprint; a classifier fits one model only")
    try:
        classifier = ExitClassifier.from_record(record["classifier"], num_layers)
    except ConfigError as exc:
        raise bad(str(exc)) from None
    missing = [layer for layer, t in enumerate(thresholds, start=1)
               if math.isfinite(t) and layer not in classifier.layers]
    if missing:
        raise bad(f"the exit classifier has no weights for layer(s) {missing}, which have finite thresholds")
    return classifier


def _threshold(layer: int, value: Any, measure: str, bad: Callable[[str], ConfigError]) -> float:
    """One entry of a record's 'thresholds' (null: inf, never exit at that layer)."""
    if value is None:
        return math.inf
    lo, hi = MEASURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise bad(f"threshold of layer {layer} is {value!r}; it must be a number in [{lo:g}, {hi:g}] or null")
    if not lo <= value <= hi:
        raise bad(f"threshold of layer {layer} is {value!r}, outside the {measure} measure's "
                  f"range [{lo:g}, {hi:g}] (null means never exit)")
    return float(value)


def thresholds_for(model: torch.nn.Module, thresholds: Thresholds | str | Path, measure: str | None = None) -> Thresholds:
    """A thresholds file or loaded Thresholds, refused unless made for this model (weights, depth, measure)."""
    fingerprint = model_fingerprint(model)
    if isinstance(thresholds, Thresholds):
        policy = thresholds_from_record(thresholds.record, model.num_layers, measure, fingerprint=fingerprint,
                                        path=thresholds.path)
    else:
        policy = load_thresholds(thresholds, model.num_layers, measure, fingerprint=fingerprint)
    if policy.classifier is not None:
        try:
            policy.classifier.check_model(model)
        except ConfigError as exc:
            where = f"thresholds file {policy.path}" if policy.path is not None else "thresholds"
            raise ConfigError(f"{where}: {exc}") from None
    return policy
