"""Issue 34: the minimum detectable effect (MDE) of the paired McNemar test that 11 reports beside every
comparison: Connor's formula, checked against the issue's worked example and against a simulation of the exact
test it stands for."""
import numpy as np
import pytest
from scipy.stats import binomtest

from utils.compare import reading, split_mde
from utils.stats import MDE_ALPHA, MDE_POWER, mcnemar_mde


def test_worked_example():
    # ~12% of items change answer between two checkpoints: 500 paired items detect about 4.3 points, 1,147 about 2.9
    assert mcnemar_mde(500, 60) == pytest.approx(0.0433, abs=5e-4)
    assert mcnemar_mde(1147, 138) == pytest.approx(0.0287, abs=5e-4)
    # the normal approximation (z_a + z_b) * sqrt(psi / n) is the same to the first order
    assert mcnemar_mde(500, 60) == pytest.approx((1.95996 + 0.84162) * np.sqrt(0.12 / 500), rel=0.01)
    # more discordance, fewer items: a larger MDE
    assert mcnemar_mde(500, 100) > mcnemar_mde(500, 60) > mcnemar_mde(1000, 120)


def test_nothing_detectable():
    assert mcnemar_mde(500, 0) is None  # the two checkpoints agree on every item
    assert mcnemar_mde(20, 3) is None   # even 3 of 3 one way falls short of 80% power


def test_the_exact_test_reaches_the_power_at_the_mde():
    """At delta = MDE the exact McNemar test (what 11 runs) rejects in about 80% of simulated studies."""
    n, psi = 500, 0.12
    delta = mcnemar_mde(n, round(psi * n))
    rng = np.random.default_rng(0)
    discordant = rng.binomial(n, psi, size=2000)
    towards_method = rng.binomial(discordant, (psi + delta) / (2 * psi))
    rejected = [binomtest(int(b), int(d), 0.5).pvalue < MDE_ALPHA for b, d in zip(towards_method, discordant)]
    assert np.mean(rejected) == pytest.approx(MDE_POWER, abs=0.04)
    # and at half the MDE far less often: a difference that small is usually not seen
    towards_method = rng.binomial(discordant, (psi + delta / 2) / (2 * psi))
    assert np.mean([binomtest(int(b), int(d), 0.5).pvalue < MDE_ALPHA
                    for b, d in zip(towards_method, discordant)]) < 0.4


def test_wording_never_says_no_effect():
    base = {"n_items": 500, "n_discordant": 60, "mde": mcnemar_mde(500, 60)}
    assert reading({**base, "p_value": 0.01}) == "differs (p < 0.05)"
    assert reading({**base, "p_value": 0.4}) == "not detected; this test sees >= 4.3 points"
    assert "no difference is detectable" in reading({**base, "p_value": 1.0, "mde": None})
    assert split_mde([{**base, "p_value": 0.4}, {"n_items": 500, "n_discordant": 40, "p_value": 0.2}]) == \
        {"n_items": 500, "discordance": 0.1, "mde": mcnemar_mde(500, 50)}
