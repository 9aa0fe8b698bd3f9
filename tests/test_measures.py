"""DEE's confidence measures on known inputs."""

from __future__ import annotations

import pytest
import torch

from layerskip.config import MEASURES
from layerskip.decoding.measures import (
    HIDDEN_MEASURES,
    LEARNED_MEASURES,
    LOGIT_MEASURES,
    logit_confidence,
    saturation_confidence,
)
from layerskip.errors import ConfigError


def test_confidence_measures_on_known_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.allclose(logit_confidence(logits, "softmax"), torch.tensor([0.5]))
    assert torch.allclose(logit_confidence(logits, "margin"), torch.tensor([0.2]))
    h = torch.tensor([[1.0, 0.0]])
    assert saturation_confidence(h, h).item() == pytest.approx(1.0)
    assert saturation_confidence(h, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0)
    assert saturation_confidence(h, -h).item() == 0.0  # clamped


def test_every_measure_is_computed_from_logits_hidden_states_or_learned_weights():
    kinds = (LOGIT_MEASURES, HIDDEN_MEASURES, LEARNED_MEASURES)
    assert sorted(sum(kinds, ())) == sorted(MEASURES) and LEARNED_MEASURES == ("classifier",)
    for measure in ("saturation", "classifier", "entropy"):
        with pytest.raises(ConfigError, match="not computed from logits"):
            logit_confidence(torch.zeros(1, 3), measure)
