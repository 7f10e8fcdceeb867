"""Baselines the benchmark compares prefetchd with (see jump_guide.py)."""
