"""The fair scheduler (pure): round robin across clients, weights, leaving, and its forecast."""

from __future__ import annotations

import copy
import itertools

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.fairness import FairScheduler


def drain(scheduler: FairScheduler[int]) -> list[str]:
    order = []
    while (popped := scheduler.pop()) is not None:
        order.append(popped[0])
    return order


def test_a_flood_costs_a_quiet_client_one_unit_per_round() -> None:
    scheduler: FairScheduler[int] = FairScheduler()
    for n in range(40):
        scheduler.push("flood", n)
    for n in range(4):
        scheduler.push("quiet", n)
    order = drain(scheduler)
    # The quiet client's 4 are served within the first 8 units, alternating with the flood.
    assert order[:8] == ["flood", "quiet"] * 4
    assert order.count("flood") == 40


def test_weights_give_that_many_units_per_turn() -> None:
    scheduler: FairScheduler[int] = FairScheduler()
    for n in range(12):
        scheduler.push("heavy", n, weight=3)
        scheduler.push("light", n)
    order = drain(scheduler)[:12]
    assert order == ["heavy"] * 3 + ["light"] + ["heavy"] * 3 + ["light"] + ["heavy"] * 3 + [
        "light"
    ]


def test_a_client_that_leaves_forgets_its_turn_and_rejoins_at_the_back() -> None:
    scheduler: FairScheduler[int] = FairScheduler()
    scheduler.push("a", 1)
    scheduler.push("b", 1)
    scheduler.push("c", 1)
    assert scheduler.remove("a", 1)
    assert not scheduler.remove("a", 1)
    scheduler.push("a", 2)
    assert drain(scheduler) == ["b", "c", "a"]
    assert len(scheduler) == 0


def test_removing_a_queued_item_keeps_the_others_in_order() -> None:
    scheduler: FairScheduler[int] = FairScheduler()
    for n in range(3):
        scheduler.push("a", n)
    scheduler.remove("a", 1)
    assert [scheduler.pop(), scheduler.pop(), scheduler.pop()] == [("a", 0), ("a", 2), None]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from("abcd"), st.integers(1, 3)),
        st.tuples(st.just("pop"), st.just(""), st.just(0)),
        st.tuples(st.just("remove"), st.sampled_from("abcd"), st.just(0)),
    ),
    max_size=60,
)


@given(ops, st.sampled_from("abcde"), st.integers(1, 3))
def test_the_forecast_is_exactly_the_units_served_first(
    history: list[tuple[str, str, int]], client: str, weight: int
) -> None:
    scheduler: FairScheduler[int] = FairScheduler()
    weights: dict[str, int] = {}
    counter = itertools.count()
    for op, name, w in history:
        if op == "push":
            w = weights.setdefault(name, w)  # a client's weight is its configuration
            scheduler.push(name, next(counter), w)
        elif op == "pop":
            scheduler.pop()
        else:
            items = [item for who, item in scheduler.items() if who == name]
            if items:
                scheduler.remove(name, items[0])
                if scheduler.length(name) == 0:
                    weights.pop(name, None)
    weight = weights.get(client, weight)
    forecast = scheduler.ahead(client, weight)
    trial = copy.deepcopy(scheduler)
    trial.push(client, -1, weight)
    served = 0
    while (popped := trial.pop()) is not None and popped[1] != -1:
        served += 1
    assert forecast == served
