"""Figures computed from a `bench.compare` results dict: fields/s, CPU per field, and the headline ratio."""

from __future__ import annotations

# The like-for-like pair: same 16-bit output (OpenCV uint16 CLAHE), prefetchd vs the guide's DataLoader.
LIKE_FOR_LIKE = ("prefetchd-opencv", "baseline-u16")


def per_field(run: dict, key: str = "cpu_s") -> float:
    eps = run.get("epochs", [])
    n = sum(e["fields"] for e in eps)
    return sum(e[key] for e in eps) / n if n else 0.0


def fps(run: dict) -> float:
    eps = run.get("epochs", [])
    w = sum(e["wall_s"] for e in eps)
    return sum(e["fields"] for e in eps) / w if w else 0.0


def ratio_vs_seed(results: dict) -> float:
    """prefetchd (OpenCV-compatible, same 16-bit output) fields/s ÷ baseline-u16 fields/s; the smaller of the
    two regimes (fits / large), so a cache win in one regime cannot hide a loss in the other."""
    ratios = []
    for regime in ("fits", "large"):
        r = results["runs"].get(regime, {})
        if all(s in r and "error" not in r[s] for s in LIKE_FOR_LIKE):
            base = fps(r["baseline-u16"])
            if base > 0:
                ratios.append(fps(r["prefetchd-opencv"]) / base)
    return min(ratios) if ratios else 0.0
