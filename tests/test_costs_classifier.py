"""layerskip.costs: the learned exit classifier's check, timed like the softmax check (inside the kernel call
where DEE runs in one)."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from layerskip import kernels
from layerskip.costs import measure_step_costs
from layerskip.decoding.measures import ExitClassifier


@pytest.mark.parametrize("hidden", [0, 4])
def test_the_classifier_check_is_timed_when_asked(hidden):
    model = tiny_model()
    costs = measure_step_costs(model, check_vocab=20, position=8, repeats=3, classifier_vocab=20,
                               classifier_hidden=hidden)
    assert costs.classifier_check > 0 and costs.classifier_vocab == 20
    assert costs.to_dict()["classifier_check"] == costs.classifier_check
    plain = measure_step_costs(model, check_vocab=20, position=8, repeats=1)
    assert plain.classifier_check is None and plain.classifier_vocab is None


@pytest.mark.skipif(not (kernels.ENABLED and kernels.available()), reason="layerskip's CPU kernels do not run here")
def test_where_dee_runs_in_one_call_the_classifier_check_is_timed_inside_it(monkeypatch):
    monkeypatch.setattr(ExitClassifier, "confidence", lambda *_, **__: pytest.fail("timed as a torch call"))
    costs = measure_step_costs(tiny_model(), check_vocab=20, position=8, repeats=3, classifier_vocab=20)
    assert costs.classifier_check > 0
