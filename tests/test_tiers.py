"""The quick tier stays quick: every test that launches processes or trains is in the `slow` tier (tests/tiers.py
marks it from what it does), and what does neither stays in the quick one."""

import inspect
from pathlib import Path

import pytest

from tests import tiers

SIGNS = ("launch(", "run_in_process(", "Popen(", '"--tiny"')


def test_every_collected_test_that_launches_or_trains_is_slow(request):
    """Checks the tests collected with it: the whole suite under plain `pytest` (a launching test missed is
    named), and under -m "not slow" none of them may launch."""
    missed = []
    for item in request.session.items:
        functions = [getattr(item, "function", None), *(d.func for defs in item._fixtureinfo.name2fixturedefs.values()
                                                          for d in defs)]
        sources = [inspect.getsource(f) for f in functions
                   if f is not None and Path(inspect.getfile(f)).is_relative_to(tiers.TESTS)]
        if any(sign in source for source in sources for sign in SIGNS) and not item.get_closest_marker("slow"):
            missed.append(item.nodeid)
    assert not missed, missed


@pytest.mark.parametrize("path, name, slow", [
    ("conftest.py", "trained_run", True),  # launches 2-process ZeRO-3
    ("conftest.py", "single_process_run", True),  # a whole run in this process
    ("conftest.py", "tiny_dir", False),  # builds files, runs nothing
    ("test_bench.py", "test_gpu_check_runs_at_toy_size", True),  # through its helper, the script's --tiny
    ("state/test_checkpoints.py", "test_sigkill_then_resume_is_bit_identical", True),  # start() -> Popen
    ("state/test_integrity.py", "test_a_manifest_records_every_file_with_its_size_and_digest", True),  # by name
    ("test_layout.py", "test_no_import_circle_anywhere_in_loop", False)])
def test_the_tier_is_found_through_helpers_and_fixtures(path, name, slow):
    assert tiers.launches(tiers.TESTS / path, name) is slow
