"""tools/fuzz_cli.py in the default run: 200 seeded mutations of the small models through qgraph-opt
and qgraph-run, in this process. Zero failures: no exit code outside 0/1/2, no traceback or internal
error, errors on one line, no output or temporary file left after a failure, the input unchanged.
A failure prints its seed, case and the command that rebuilds it. `python tools/fuzz_cli.py --seed 0
--count 10000` is the recorded run; `-m slow` runs 2,000 cases here."""
import pytest

from fuzz_cli import fuzz
from test_bad_inputs import only_with_slow


def check(count: int, seed: int, budget: float) -> None:
    tally = fuzz(seed, count, case_seconds=60.0, budget=budget, quiet=True)
    ran = sum(tally.codes.values())
    assert not tally.failures, "\n".join(tally.failures)
    assert ran >= min(count, 100), f"only {ran} cases ran within {budget} s"
    assert tally.codes[0] > 0 and tally.codes[2] > 0, dict(tally.codes)   # both valid and refused models met


def test_fuzz_cli_200_cases():
    check(200, seed=0, budget=300.0)


@pytest.mark.slow
def test_fuzz_cli_2000_cases(request):
    only_with_slow(request, "2,000 fuzz cases")
    check(2000, seed=1, budget=3600.0)
