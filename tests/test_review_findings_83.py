"""Review 83: attacks on f9f6ea4 (one noise floor 1e-3, PLD floor) and 95fa8d1 (bounded data lines, fstat, federated
stop path)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli, one_line_error

DEMO = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
TRAIN = str(DEMO / "sst2_demo_train.tsv")
TINY = ("--model", "tiny-llama")


@pytest.mark.parametrize("flags", [("--client-dp-clip", "1", "--client-dp-noise", "0.0005"),
                                   ("--local-optimizer", "dpzero", "--local-dp-noise", "0.0005")],
                         ids=["client-dp-noise", "local-dp-noise"])
def test_federate_noise_below_floor_is_refused_naming_its_own_flag_before_work(tmp_path, flags):
    """f9f6ea4 put a 1e-3 floor in the accountant (check_noise) and on train's --noise-multiplier, but federate's
    --client-dp-noise and --local-dp-noise still take any value > 0 (settings/federate.py low=0) and check_run accepts
    5e-4. The accountant then refuses it deep inside the run (after the model and data are built, --out created),
    in a message naming --noise-multiplier / --epsilon, flags federate does not have.
    Expected: one line naming the flag given (--client-dp-noise / --local-dp-noise), exit 2, nothing in --out."""
    out = tmp_path / "out"
    res = cli("federate", "--data", TRAIN, *TINY, "--clients", "2", "--rounds", "1", *flags, "--out", out)
    line = one_line_error(res)
    assert flags[-2] in line, line
    assert "--noise-multiplier" not in line and "--epsilon" not in line, line
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_reading_a_table_leaves_the_callers_csv_field_limit_as_it_was(tmp_path):
    """95fa8d1 lowered readers.FIELD_LIMIT from 2**31 - 1 to 64 Mi and still sets it process-wide with
    csv.field_size_limit on every table read. A notebook (or a library in the same process) that raised the limit
    for its own CSVs now has it lowered to 64 Mi by merely reading a slimtune data file: its next read of a larger
    field fails. Before the commit the same caller's 2**31 - 1 was left as it was.
    Expected: the reader bounds its own fields without changing the process-wide limit (or restores it)."""
    import csv

    from slimtune.data.readers import read_examples
    from slimtune.data.tasks import get_task

    before = csv.field_size_limit()
    try:
        csv.field_size_limit(2**31 - 1)
        read_examples(TRAIN, get_task("sst2"))
        assert csv.field_size_limit() == 2**31 - 1, csv.field_size_limit()
    finally:
        csv.field_size_limit(before)



def test_pld_fine_discretization_prices_a_common_sigma():
    """f9f6ea4's PLD floor, pld_noise_floor(disc) = max(1e-3, 0.1 * sqrt(1e-3 / disc)), ignores the sampling rate and
    the steps: at --pld-discretization 1e-5 it is 1.0, so a run at sigma 0.9 (SST-2's 67,349 rows, batch 64, 1,000
    steps) is refused 'cannot price noise below 1 (its privacy-loss distribution outgrows memory)', although
    dp-accounting prices it at epsilon ~0.185 in ~3 s and ~400 MB (one thread). Before the commit it was priced.
    Expected: a finite epsilon, as before."""
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    spec = PrivacySpec(accountant="pld", pld_discretization=1e-5, delta=1e-5)
    eps = PrivacyAccountant(spec, 67349, 64, 0.9).epsilon(1000)
    assert 0.1 < eps < 0.3, eps


@pytest.mark.slow  # ~100 s of real PLD probes at 1e-5; the fast test below covers the same path with cheap pricing
def test_pld_fine_discretization_calibrates_a_common_budget():
    """The same floor in calibration: --epsilon 0.5 at --pld-discretization 1e-5 (67,349 rows, batch 64, 1,000 steps)
    is refused as 'beyond what can be accounted ... use --epsilon <= 0.1407': the user is told to ask for a smaller
    epsilon (more noise) than the one wanted, for a budget any DP run takes, which the accountant prices (sigma
    below 1 at a rate of ~1e-3 is a small privacy-loss distribution). Expected: a noise multiplier (below 1)."""
    from slimtune.privacy.accountant import PrivacySpec, calibrate_noise

    spec = PrivacySpec(accountant="pld", pld_discretization=1e-5, delta=1e-5, target_epsilon=0.5)
    sigma = calibrate_noise(spec, 67349, 64, 1000)
    assert 0.3 < sigma < 1.0, sigma


def test_pld_fine_discretization_calibration_is_not_floored_above_a_common_answer(monkeypatch):
    """(lead) The test above, within the suite's time: the same calibration (PLD at --pld-discretization 1e-5, SST-2's
    67,349 rows, batch 64, 1,000 steps, epsilon 1) with each probe priced by RDP at the probe's own sigma (cheap,
    monotone, the same order of answer) instead of a 1e-5 PLD grid. What is under test is the search's floor: before
    review 83's fix it was 1.0 at this grid, and every budget whose answer lies below 1 was refused as 'beyond what
    can be accounted'."""
    from dataclasses import replace

    from slimtune.privacy import accountant as acc

    real_epsilon = acc.PrivacyAccountant.epsilon

    def rdp_priced(self, steps):
        if self.spec.accountant != "pld":
            return real_epsilon(self, steps)
        cheap = acc.PrivacyAccountant(replace(self.spec, accountant="rdp"), self.n, self.batch_size, self.noise,
                                      self.releases)
        return real_epsilon(cheap, steps)

    monkeypatch.setattr(acc.PrivacyAccountant, "epsilon", rdp_priced)
    spec = acc.PrivacySpec(accountant="pld", pld_discretization=1e-5, delta=1e-5, target_epsilon=1.0)
    sigma = acc.calibrate_noise(spec, 67349, 64, 1000)
    assert 0.3 < sigma < 1.0, sigma


def test_the_python_pricing_functions_take_the_pld_discretization_their_messages_name():
    """(lead) Review 83's suspicion, confirmed: the PLD floor's message in slimtune.privacy.epsilon names
    pld_discretization, which the function did not take, so a caller could neither follow the advice nor price PLD
    at any other grid than 1e-3. Both pricing functions take it, and a coarser grid prices a sigma the default
    refuses."""
    import slimtune
    from slimtune import SlimtuneError

    kw = dict(dataset_size=1000, batch_size=16, steps=10, accountant="pld")
    with pytest.raises(SlimtuneError, match="pld_discretization"):
        slimtune.privacy.epsilon(noise_multiplier=0.05, **kw)
    coarse = slimtune.privacy.epsilon(noise_multiplier=0.05, pld_discretization=1e-2, **kw)
    assert coarse > 0
    fine = slimtune.privacy.epsilon(noise_multiplier=1.0, pld_discretization=1e-4, **kw)
    default = slimtune.privacy.epsilon(noise_multiplier=1.0, **kw)
    assert fine <= default  # a finer grid is less pessimistic
    sigma = slimtune.privacy.noise_multiplier(epsilon=default, pld_discretization=1e-4, **kw)
    assert sigma <= 1.0 + 1e-3
    with pytest.raises(SlimtuneError, match="pld_discretization"):
        slimtune.privacy.epsilon(noise_multiplier=1.0, pld_discretization=-1.0, **kw)
