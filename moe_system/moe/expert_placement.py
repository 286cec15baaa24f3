"""Where experts run: a placement search that minimises the most loaded expert-parallel rank.

A placement maps canonical expert e to physical slot slot_of_expert[e]; slot p lives on EP rank p // E_local.
Given each expert's load (routed tokens over a window), the busiest rank sets the step time (its experts
compute the most rows and it waits longest in the all-to-all), so the objective is the maximum over ranks of
the summed load of its experts, with exactly E_local experts per rank.

The search (deterministic, run identically on every rank from the same all-reduced loads):
1. Candidates: the current grouping, and a greedy longest-processing-time grouping (experts in decreasing load,
   each to the least loaded rank that still has a free slot).
2. Each candidate is improved by pairwise swaps: while some swap between the busiest rank and another rank
   lowers the larger of the two ranks' loads below the busiest load, apply the best such swap. Every applied
   swap strictly lowers the sum of squared rank loads, so this terminates.
3. A branch and bound (heaviest experts first, bounded by the best grouping so far) looks for a strictly better
   grouping within a fixed node budget: it proves optimality for small layouts (8-16 experts) and can only
   improve on the heuristics for large ones.
4. The best grouping (lowest maximum, then lowest sum of squares) is assigned to ranks so that as many experts
   as possible stay where they are (greedy by overlap), and an expert that stays keeps its slot.

The reference (docs/moe.md, Expert load rebalancing) ran a beam search over swaps that minimises deviations of
rank means and never moves an expert twice; tests/test_rebalance.py compares both on recorded skewed loads and
with the exact optimum for small cases.
"""

from collections.abc import Sequence

SEARCH_BUDGET = 20_000  # branch-and-bound nodes: exact for small layouts, milliseconds for large ones


def rank_loads(load: Sequence[float], slot_of_expert: Sequence[int], ep: int) -> list[float]:
    local = len(load) // ep
    totals = [0.0] * ep
    for expert, slot in enumerate(slot_of_expert):
        totals[slot // local] += float(load[expert])
    return totals


def imbalance(load: Sequence[float], slot_of_expert: Sequence[int], ep: int) -> float:
    """max / mean of the ranks' loads (1.0 = perfectly balanced)."""
    totals = rank_loads(load, slot_of_expert, ep)
    mean = sum(totals) / ep
    return max(totals) / mean if mean > 0 else 1.0


def _score(groups: list[list[int]], load: Sequence[float]) -> tuple[float, float]:
    totals = [sum(load[e] for e in group) for group in groups]
    return max(totals), sum(t * t for t in totals)


def _greedy_groups(load: Sequence[float], ep: int, local: int) -> list[list[int]]:
    groups, totals = [[] for _ in range(ep)], [0.0] * ep
    for expert in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        rank = min((r for r in range(ep) if len(groups[r]) < local), key=lambda r: (totals[r], r))
        groups[rank].append(expert)
        totals[rank] += load[expert]
    return groups


def _improve_by_swaps(groups: list[list[int]], load: Sequence[float]) -> list[list[int]]:
    groups = [list(g) for g in groups]
    totals = [sum(load[e] for e in g) for g in groups]
    while True:
        busiest = max(range(len(groups)), key=lambda r: (totals[r], -r))
        best = None  # (larger of the two new loads, other rank, index in busiest, index in other, delta)
        for other in range(len(groups)):
            if other == busiest:
                continue
            for i, a in enumerate(groups[busiest]):
                for j, b in enumerate(groups[other]):
                    delta = load[a] - load[b]
                    if delta <= 0:
                        continue
                    high = max(totals[busiest] - delta, totals[other] + delta)
                    if high < totals[busiest] and (best is None or high < best[0]):
                        best = (high, other, i, j, delta)
        if best is None:
            return groups
        _, other, i, j, delta = best
        groups[busiest][i], groups[other][j] = groups[other][j], groups[busiest][i]
        totals[busiest] -= delta
        totals[other] += delta


def _branch_and_bound(load: Sequence[float], ep: int, local: int, upper: float, budget: int):
    """Groups whose busiest rank is below `upper`, searching exactly (heaviest experts first, each to every rank
    with room, pruning on the bound) until `budget` nodes were visited; None if none better was found."""
    order = sorted(range(len(load)), key=lambda e: (-load[e], e))
    remaining = [0.0] * (len(order) + 1)
    for k in range(len(order) - 1, -1, -1):
        remaining[k] = remaining[k + 1] + load[order[k]]
    groups, totals = [[] for _ in range(ep)], [0.0] * ep
    best, visited = None, 0

    def visit(k: int) -> None:
        nonlocal best, upper, visited
        if k == len(order):
            best, upper = [list(g) for g in groups], max(totals)
            return
        expert, seen = order[k], set()
        for rank in sorted(range(ep), key=lambda r: (totals[r], r)):
            state = (len(groups[rank]), totals[rank])
            if len(groups[rank]) == local or state in seen:  # ranks in the same state are interchangeable
                continue
            seen.add(state)
            total = totals[rank] + load[expert]
            # Bound: this rank's new load, and the average that the rest must at least raise some rank to.
            if total >= upper or (sum(totals) + remaining[k]) / ep >= upper or visited >= budget:
                continue
            visited += 1
            groups[rank].append(expert)
            totals[rank] = total
            visit(k + 1)
            groups[rank].pop()
            totals[rank] -= load[expert]

    visit(0)
    return best


def _assign_to_ranks(groups: list[list[int]], slot_of_expert: Sequence[int], local: int) -> list[int]:
    """Give each group a rank, keeping as many experts in place as possible, and each expert a slot."""
    ep = len(groups)
    current_rank = [slot // local for slot in slot_of_expert]
    overlaps = sorted(((sum(current_rank[e] == r for e in group), -g, -r) for g, group in enumerate(groups)
                       for r in range(ep)), reverse=True)
    rank_of_group, taken = {}, set()
    for _, neg_g, neg_r in overlaps:
        g, r = -neg_g, -neg_r
        if g not in rank_of_group and r not in taken:
            rank_of_group[g] = r
            taken.add(r)
    new_slot = [0] * len(slot_of_expert)
    for g, group in enumerate(groups):
        rank = rank_of_group[g]
        staying = [e for e in group if current_rank[e] == rank]
        free = sorted(set(range(rank * local, (rank + 1) * local)) - {slot_of_expert[e] for e in staying})
        for e in staying:
            new_slot[e] = slot_of_expert[e]
        for e, slot in zip(sorted(e for e in group if current_rank[e] != rank), free):
            new_slot[e] = slot
    return new_slot


def balanced_placement(load: Sequence[float], slot_of_expert: Sequence[int], ep: int) -> list[int]:
    """A new slot_of_expert whose busiest rank carries as little load as the search finds (never more than now)."""
    num_experts = len(load)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts cannot be split over {ep} expert-parallel ranks")
    local = num_experts // ep
    load = [float(x) for x in load]
    current = [[] for _ in range(ep)]
    for expert, slot in enumerate(slot_of_expert):
        current[slot // local].append(expert)
    candidates = [_improve_by_swaps(groups, load) for groups in (current, _greedy_groups(load, ep, local))]
    best = min(candidates, key=lambda groups: _score(groups, load))
    exact = _branch_and_bound(load, ep, local, _score(best, load)[0] * (1 - 1e-9), SEARCH_BUDGET)
    if exact is not None:
        best = _improve_by_swaps(exact, load)
    if _score(best, load)[0] >= _score(current, load)[0]:  # moving costs traffic: only for a lower maximum
        return list(slot_of_expert)
    return _assign_to_ranks(best, slot_of_expert, local)


def moved_experts(old: Sequence[int], new: Sequence[int], local: int) -> int:
    """How many experts change rank between two placements."""
    return sum(a // local != b // local for a, b in zip(old, new))
