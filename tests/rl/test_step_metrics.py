from __future__ import annotations

import pytest

from respec.rl.step_metrics import form_shares


def test_form_shares_name_every_known_form_even_when_absent():
    shares = form_shares(["rare", "common", "common", "other"], ("common", "rare", "other"))
    assert shares == {"form_common": 0.5, "form_rare": 0.25, "form_other": 0.25}
    assert form_shares(["common"] * 4, ("common", "rare")) == {"form_common": 1.0, "form_rare": 0.0}
    assert form_shares([], ("common",)) == {}
    assert form_shares(["", ""], ()) == {}  # a task that tells no forms apart reports none


@pytest.mark.parametrize("forms", [["x"], ["a", "b", "a"]])
def test_shares_of_all_forms_sum_to_one(forms):
    assert sum(form_shares(forms, tuple(set(forms))).values()) == pytest.approx(1.0)
