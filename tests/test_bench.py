"""The benchmark's own parts that its numbers rest on (the benchmark itself is run by hand: docs/performance.md)."""

import json

from bench import autogen_alone
from bench.clients import send_delay


def test_spread_sends_are_evenly_spaced_and_all_at_once_by_default():
    assert [send_delay(i, 4, 2.0) for i in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert {send_delay(i, 4, 0.0) for i in range(4)} == {0.0}


def test_autogen_alone_measures_each_way_of_building_the_team_in_order(tmp_path):
    """A few real runs against the offline model server: each part of a run's CPU is inside the next."""
    out = tmp_path / "alone.json"
    assert autogen_alone.main(["--runs", "3", "--warmup", "1", "--cpus", "", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("loaded_from_json_per_run", "shared_model_client"):
        numbers = report[name]
        assert numbers["runs"] == 3
        asked, first, total = (numbers[key]["median"] for key in
                               ("cpu_ms_before_model_client", "cpu_ms_to_first_token", "cpu_ms_per_run"))  # fmt: skip
        assert 0 < asked < first <= total
