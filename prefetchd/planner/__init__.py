"""The prefetch planner: which fields to fetch ahead and which slot each may take. One class per eviction
policy (`lru.py`, `belady.py`), the shared windows and depth in `base.py`; the offline bounds they are measured
against are in `prefetchd/bounds.py`.

To change eviction, change (or add) a planner class here and its name in `prefetchd/policy.py`; nothing else
branches on the policy.
"""

from __future__ import annotations

from prefetchd.planner.base import Planner
from prefetchd.planner.belady import BeladyPlanner
from prefetchd.planner.lru import LruPlanner
from prefetchd.policy import Policy

PLANNERS: dict[Policy, type[Planner]] = {Policy.LRU: LruPlanner, Policy.BELADY: BeladyPlanner}


def make_planner(policy: Policy | str, **kwargs) -> Planner:
    return PLANNERS[Policy.parse(policy)](**kwargs)


__all__ = ["BeladyPlanner", "LruPlanner", "PLANNERS", "Planner", "Policy", "make_planner"]
