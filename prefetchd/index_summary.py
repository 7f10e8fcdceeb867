"""What `prefetchd index` shows: the index per source and batch, as a table or as JSON (`--json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from prefetchd.catalog import Catalog
from prefetchd.channels import BRIGHTFIELD_CHANNELS, DEFAULT_CHANNELS
from prefetchd.jump_sources import optics_of

if TYPE_CHECKING:
    from prefetchd.index import Index

STAIN_ORDER = DEFAULT_CHANNELS + BRIGHTFIELD_CHANNELS


@dataclass
class GroupSummary:
    """One source and batch of an index."""

    source: str
    batch: str
    layouts: list[str]
    plates: int
    fields: int                  # complete and selected
    incomplete: int              # in selected plates/wells, missing a selected channel
    channels_found: list[str]    # stains with at least one file in the group
    origins: list[str]           # "load_data", "LIST", "index file", "walk"
    unparsed: int = 0
    unparsed_examples: list[str] = field(default_factory=list)
    unmapped: int = 0
    unmapped_examples: list[str] = field(default_factory=list)
    skipped: int = 0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)
    pixel_size_um: float | None = None
    shape: list[int] | None = None


def summarise_groups(catalog: Catalog, in_scope: np.ndarray, complete: np.ndarray) -> list[GroupSummary]:
    """Per (source, batch): plates, fields, layouts, channels found, incomplete, what could not be used."""
    plates = catalog.plates
    plate_group = [p.group for p in plates]
    names = sorted(set(plate_group) | set(catalog.reports))
    position = {name: i for i, name in enumerate(names)}
    group_of_plate = np.array([position[g] for g in plate_group] + [0], np.int64)
    plate_codes = catalog.fields["plate"].to_numpy() if len(catalog) else np.zeros(0, np.int32)
    group = group_of_plate[plate_codes]
    n = len(names)
    fields = np.bincount(group[in_scope & complete], minlength=n)
    incomplete = np.bincount(group[in_scope & ~complete], minlength=n)
    found: list[set[str]] = [set() for _ in names]
    for stain in catalog.stains:
        present = pc.is_valid(catalog.fields[f"file_{stain}"]).to_numpy(zero_copy_only=False)
        for g in np.flatnonzero(np.bincount(group[present & in_scope], minlength=n)):
            found[g].add(stain)
    used = np.zeros(len(plates), bool)
    used[np.unique(plate_codes[in_scope])] = True
    members: dict[str, list] = {}
    for info, name, is_used in zip(plates, plate_group, used):
        if is_used:
            members.setdefault(name, []).append(info)
    out = []
    for g, name in enumerate(names):
        mine = members.get(name, [])
        report = catalog.reports.get(name)
        if not mine and (report is None or not (report.unparsed or report.unmapped or report.notes)):
            continue
        source, batch = (mine[0].source, mine[0].batch) if mine else _split(name)
        optics = optics_of(source, mine[0].layout) if mine else None
        out.append(GroupSummary(
            source=source, batch=batch, layouts=sorted({p.layout for p in mine}), plates=len(mine),
            fields=int(fields[g]), incomplete=int(incomplete[g]),
            channels_found=[s for s in STAIN_ORDER if s in found[g]],
            origins=list(report.origins) if report else [],
            unparsed=report.unparsed if report else 0,
            unparsed_examples=list(report.unparsed_examples) if report else [],
            unmapped=report.unmapped if report else 0,
            unmapped_examples=list(report.unmapped_examples) if report else [],
            skipped=report.skipped if report else 0, duplicates=report.duplicates if report else 0,
            notes=list(report.notes) if report else [],
            pixel_size_um=optics.pixel_size_um if optics else None,
            shape=list(optics.shape) if optics and optics.shape else None))
    return out


def _split(name: str) -> tuple[str, str]:
    if name.startswith("source_") and "/" in name:
        source, _, batch = name.partition("/")
        return source, batch
    return "", name


def index_summary(index: "Index") -> dict:
    """Everything `prefetchd index` prints, as JSON-ready data (`--json`)."""
    return {
        "dataset": index.dataset,
        "fields": len(index.fields),
        "total_fields": index.total_fields,
        "plates": len(index.plates),
        "batches": len(index.batches),
        "channels": list(index.channels),
        "incomplete": index.incomplete,
        "unparsed": index.unparsed,
        "unparsed_examples": index.unparsed_examples,
        "unmapped": index.unmapped,
        "groups": [asdict(g) for g in index.groups],
        "optics": index.optics,
        "channel_maps": index.channel_maps,
        "discovery": index.discovery,
        "seconds": round(index.seconds, 3),
        "from_cache": index.from_cache,
        "cache": index.cache_path,
    }


def print_index_summary(index: "Index", console: Any) -> None:
    from rich.table import Table

    console.print(f"fields:            {len(index.fields):,}")
    console.print(f"plates:            {len(index.plates):,}")
    console.print(f"batches:           {len(index.batches):,}")
    console.print(f"channels:          {', '.join(index.channels)}")
    console.print(f"incomplete fields: {index.incomplete:,} (missing a selected channel, skipped)")
    console.print(f"unparsed keys:     {index.unparsed:,}")
    for example in index.unparsed_examples[:5]:
        console.print(f"  e.g. {example}", markup=False)
    if index.unmapped:
        console.print(f"unmapped channels: {index.unmapped:,} image keys whose stain is unknown (no load_data)")
    table = Table(title="per source and batch", title_justify="left")
    numeric = ("plates", "fields", "incomplete", "unparsed", "unmapped", "skipped", "µm/px")
    for column in ("source", "batch", "layout", "plates", "fields", "incomplete", "channels found", "from",
                   "unparsed", "unmapped", "skipped", "µm/px"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for g in index.groups:
        table.add_row(g.source or "-", g.batch or "-", ",".join(g.layouts) or "-", f"{g.plates:,}",
                      f"{g.fields:,}", f"{g.incomplete:,}", ",".join(g.channels_found) or "-",
                      ",".join(g.origins) or "-", f"{g.unparsed:,}", f"{g.unmapped:,}", f"{g.skipped:,}",
                      f"{g.pixel_size_um:.3f}" if g.pixel_size_um else "-")
    console.print(table)
    for g in index.groups:
        label = "/".join(part for part in (g.source, g.batch) if part) or "(no source/batch)"
        for kind, examples in (("unparsed", g.unparsed_examples), ("unmapped", g.unmapped_examples),
                               ("note", g.notes)):
            for example in examples[:3]:
                console.print(f"  {label} {kind}: {example}", markup=False)
    d = index.discovery
    if "load_data_plates" in d and "folder_lists" in d:
        console.print(f"discovery:         {d['load_data_plates']:,} plates from load_data "
                      f"({d['load_data_gets']:,} GETs, {d['folder_lists']:,} folder LISTs), "
                      f"{len(d['listed_prefixes']):,} prefixes LISTed key by key ({d['list_requests']:,} LISTs)")
    console.print(f"seconds:           {index.seconds:.2f}")
    console.print(f"cache:             {index.cache_path or 'not written'}", markup=False)
