"""Human-readable rendering of the daemon's status (rich tables), used by `prefetchd status`."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def concurrency_line(c: dict[str, Any]) -> str:
    """`12/32 (3 throttles, 1 decrease)`: the GET limit now / s3.max_concurrency, and why it moved."""
    if not c.get("adaptive", c["minimum"] < c["maximum"]):
        return f"{c['limit']}/{c['maximum']} (fixed, {_plural(c['throttles'], 'throttle')})"
    return (f"{c['limit']}/{c['maximum']} ({_plural(c['throttles'], 'throttle')}, "
            f"{_plural(c['decreases'], 'decrease')}, {_plural(c['increases'], 'increase')})")


def illum_line(i: dict[str, Any]) -> str:
    """`48 plates, 4.4 MB of 5,000.0 MB`: the daemon-wide illumination store against its budget."""
    line = f"{_plural(i['plates'], 'plate')}, {_mb(i['bytes'])} of {_mb(i['budget_bytes'])}"
    return line + (f", {_plural(i['evictions'], 'eviction')}" if i.get("evictions") else "")


def render_status(s: dict[str, Any]) -> Group:
    overview = Table(title=f"prefetchd {s['version']} (pid {s['pid']}) on {s['socket']}", show_header=False)
    overview.add_column("counter", style="bold")
    overview.add_column("value", justify="right")
    rows = [
        ("uptime", f"{s['uptime_s']:.0f} s"),
        ("jobs", str(len(s["jobs"]))),
        ("fields served", f"{s['fields_served']:,}"),
        ("cache hits / misses", f"{s['cache_hits']:,} / {s['cache_misses']:,}"),
        ("hit rate", f"{s['hit_rate']:.1%}"),
        ("fetched", f"{_mb(s['bytes_fetched'])} in {s['gets']:,} GETs"),
        *([("of which illumination", f"{_mb(s['illum_bytes_fetched'])} in {s['illum_gets']:,} GETs")]
          if "illum_gets" in s else []),
        *([("illumination held", illum_line(s["illum"]))] if s.get("illum") else []),
        *([("fields copied between jobs", f"{s['fields_shared']:,}")] if s.get("fields_shared") else []),
        ("fetch rate (10 s)", f"{s['fetch_mb_per_s']:.1f} MB/s"),
        ("GETs in flight", str(s["inflight_requests"])),
        *([("GET concurrency", concurrency_line(s["concurrency"]))] if s.get("concurrency") else []),
        ("retries", str(s["retries"])),
        ("quarantined", str(s["quarantined"])),
        ("shared memory", _mb(s["shm_bytes"])),
        ("slots", ", ".join(f"{k.lower()} {v}" for k, v in s["slots"].items()) or "-"),
        ("consumer stall", f"{s['stall_s']:.2f} s"),
    ]
    for name, p in s.get("indexing", {}).items():
        total = p.get("plates_total")
        rows.append(("indexing", f"{name}: {p['plates_done']}/{total if total is not None else '?'} plates, {p['keys']:,} keys"))
    for row in rows:
        overview.add_row(*row)
    parts: list[Any] = [overview]
    if s["jobs"]:
        jobs = Table(title="jobs")
        for col in ("job", "fields", "ranks (epoch:pos)", "served", "hit rate", "C/N bound", "fetched", "stall", "slots"):
            jobs.add_column(col)
        for j in s["jobs"]:
            ranks = " ".join(f"{r}:{v['epoch']}:{v['position']}{'' if v['connected'] else '(gone)'}"
                             + (f" stall {v['stall_s']:.1f}s" if v.get("stall_s") else "")
                             for r, v in j["ranks"].items())
            jobs.add_row(j["job"], f"{j['fields']:,}", ranks, f"{j['fields_served']:,}", f"{j['hit_rate']:.1%}",
                         f"{j['hit_rate_bound']:.1%}", f"{j['fields_fetched']:,}"
                         + (f" (+{j['fields_shared']:,} copied)" if j.get("fields_shared") else ""), f"{j['stall_s']:.2f} s",
                         " ".join(f"{k.lower()} {v}" for k, v in j["slots"].items() if v))
        parts.append(jobs)
        for j in s["jobs"]:
            if shape := j.get("field_shape"):
                how = f" ({shape['option']['mode']})" if shape.get("option") else ""
                parts.append(f"{j['job']}: fields {'×'.join(map(str, shape['size']))}{how}; "
                             f"{'; '.join(shape['sources'])}")
            for q in j["quarantined"][:10]:
                parts.append(f"[red]quarantined[/red] {q['field']}: {q['reason']}")
    if (s.get("illum") or {}).get("warning"):
        parts.append(f"[yellow]warning[/yellow] {s['illum']['warning']}")
    return Group(*parts)
