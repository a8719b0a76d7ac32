"""Test ports: each process of a tier split in two picks from its own slice."""

from __future__ import annotations

import pytest

from tests.fixtures import ports


def test_slices_are_disjoint_and_inside_the_whole_range() -> None:
    low, high = ports.port_range("")
    first = ports.port_range("0/2")
    second = ports.port_range("1/2")
    assert low <= first[0] < first[1] <= second[0] < second[1] <= high
    assert first[1] - first[0] == second[1] - second[0] >= 4096


def test_free_port_stays_in_the_slice_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATSMESH_PORT_SLICE", "1/2")
    low, high = ports.port_range()
    assert (low, high) == ports.port_range("1/2")
    picked = {ports.free_port() for _ in range(50)}
    assert all(low <= port < high for port in picked), sorted(picked)


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b", "1/0"])
def test_a_bad_slice_is_refused_with_the_expected_form(spec: str) -> None:
    with pytest.raises(ValueError, match="NATSMESH_PORT_SLICE"):
        ports.port_range(spec)


def test_no_port_is_handed_out_twice_among_the_recent_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A narrow slice makes a repeat likely within a few hundred random picks,
    # were picks not remembered (none of them is bound meanwhile).
    monkeypatch.setenv("NATSMESH_PORT_SLICE", "3/32")
    low, high = ports.port_range()
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert all(low <= port < high for port in picked)
