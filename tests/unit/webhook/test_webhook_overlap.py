"""Selector overlap is exact for every operator: checked against brute force.

Two selectors overlap iff some label set matches both. Over the keys they
mention, with each key absent or set to a value they mention or to one they
do not (label values are unbounded), brute force enumerates every case
that can matter, so it is the ground truth for :func:`selectors_overlap`.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from natsmesh_operator.api import LabelSelector
from natsmesh_operator.webhook import admission

pytestmark = pytest.mark.unit

KEYS = ("app", "tier", "track")
VALUES = ("a", "b", "c")
FRESH = "zz-unmentioned"


def random_selector(rnd: random.Random) -> LabelSelector:
    labels = {k: rnd.choice(VALUES) for k in rnd.sample(KEYS, rnd.randrange(0, 2))}
    exprs: list[dict[str, Any]] = []
    for _ in range(rnd.randrange(0 if labels else 1, 4)):
        op = rnd.choice(("In", "NotIn", "Exists", "DoesNotExist"))
        expr: dict[str, Any] = {"key": rnd.choice(KEYS), "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = rnd.sample(VALUES, rnd.randrange(1, 3))
        exprs.append(expr)
    return LabelSelector.model_validate({"matchLabels": labels, "matchExpressions": exprs})


def brute_force(a: LabelSelector, b: LabelSelector) -> bool:
    for combo in itertools.product((None, *VALUES, FRESH), repeat=len(KEYS)):
        labels = {k: v for k, v in zip(KEYS, combo, strict=True) if v is not None}
        if a.matches(labels) and b.matches(labels):
            return True
    return False


def test_overlap_agrees_with_brute_force_on_random_selectors() -> None:
    rnd = random.Random(20261212)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        a, b = random_selector(rnd), random_selector(rnd)
        expected = brute_force(a, b)
        assert admission.selectors_overlap(a, b) is expected, (a, b)
        assert admission.selectors_overlap(b, a) is expected
        seen[expected] += 1
    assert min(seen.values()) > 300  # both answers well exercised


def sel(labels: dict[str, str] | None = None, *exprs: dict[str, Any]) -> LabelSelector:
    return LabelSelector.model_validate(
        {"matchLabels": labels or {}, "matchExpressions": list(exprs)}
    )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        # Different values of one key, one of them set-based: apart.
        (sel({"app": "x"}), sel(None, {"key": "app", "operator": "In", "values": ["y"]}), False),
        # NotIn the other's value: apart; NotIn another value: together.
        (sel({"app": "x"}), sel(None, {"key": "app", "operator": "NotIn", "values": ["x"]}), False),
        (sel({"app": "x"}), sel(None, {"key": "app", "operator": "NotIn", "values": ["y"]}), True),
        # A label required by one and forbidden by the other: apart.
        (sel({"app": "x"}), sel({"v": "1"}, {"key": "app", "operator": "DoesNotExist"}), False),
        # Both only exclude: a pod without the label matches both.
        (
            sel(None, {"key": "app", "operator": "NotIn", "values": ["x"]}),
            sel(None, {"key": "app", "operator": "DoesNotExist"}),
            True,
        ),
        # Exists against In: together.
        (
            sel(None, {"key": "app", "operator": "Exists"}),
            sel(None, {"key": "app", "operator": "In", "values": ["a", "b"]}),
            True,
        ),
        # In sets that do not intersect: apart, even with other keys shared.
        (
            sel({"team": "t"}, {"key": "app", "operator": "In", "values": ["a"]}),
            sel({"team": "t"}, {"key": "app", "operator": "In", "values": ["b", "c"]}),
            False,
        ),
    ],
)
def test_set_based_cases(a: LabelSelector, b: LabelSelector, overlap: bool) -> None:
    assert admission.selectors_overlap(a, b) is overlap
