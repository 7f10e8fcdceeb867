"""Which stain each channel of a key layout holds: learned from load_data, else a fixed table where one holds.

The stain ↔ file mapping is a property of how a source set up its microscope, not of the key layout:
jump-cellpainting/datasets `metadata/channel_mapping.csv` lists, per cpg0016 source, the channel number of
each stain, and they differ (Phenix source 1 images DNA as ch4, source 4 as ch5; the Yokogawa sources use
several orders). So, in order:

1. what the plate's (or, for a plate without one, its source's) load_data says: `FileName_OrigDNA` is
   `…-ch4sk1fk1fl1.tiff` → token ch4 holds DNA for that source;
2. a fixed table only where it is known to hold: the Phenix order of cpg0000 (ch1 Mito … ch5 DNA, ch6–ch8
   brightfield), which cpg0016 sources 3 and 4 share, for every Phenix key except the cpg0016 sources listed
   in PHENIX_OTHER_ORDER; ImageXpress wN (w1 Mito … w5 DNA, source 8);
3. otherwise the channel is unmapped: counted and reported with an example, never guessed.
"""

from __future__ import annotations

from collections import defaultdict

from prefetchd.channels import PHENIX_CHANNELS

PHENIX_CPG0000: dict[str, str] = {f"ch{number}": stain for stain, number in PHENIX_CHANNELS.items()}
IMAGEXPRESS_WAVES: dict[str, str] = {"w1": "Mito", "w2": "AGP", "w3": "RNA", "w4": "ER", "w5": "DNA"}
# cpg0016 Phenix/Operetta sources that image the stains in another order than cpg0000 (channel_mapping.csv:
# source 1 DNA=4 ER=1 RNA=2 AGP=5 Mito=3; 9: 4,1,5,3,2; 11: 1,2,4,3,5; 15: 1,2,2,3,4).
PHENIX_OTHER_ORDER = frozenset({("cpg0016-jump", f"source_{n}") for n in (1, 9, 11, 15)})


def fixed_stain(layout: str, token: str, project: str = "", source: str = "") -> str | None:
    """The stain a token holds by a fixed table, or None where no table is known to hold."""
    if layout == "phenix":
        if (project, source) in PHENIX_OTHER_ORDER:
            return None
        return PHENIX_CPG0000.get(token)
    if layout == "imagexpress":
        return IMAGEXPRESS_WAVES.get(token)
    return None


class ChannelMaps:
    """Token → stain per (source, layout), learned from load_data rows; conflicting tokens are dropped."""

    def __init__(self) -> None:
        self._learned: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        self.conflicts: dict[tuple[str, str], set[str]] = defaultdict(set)

    def learn(self, source: str, layout: str, token: str, stain: str) -> None:
        table = self._learned[source, layout]
        if token in self.conflicts[source, layout]:
            return
        known = table.get(token)
        if known is None:
            table[token] = stain
        elif known != stain:
            del table[token]
            self.conflicts[source, layout].add(token)

    def learned(self, source: str, layout: str) -> dict[str, str]:
        return dict(self._learned.get((source, layout), {}))

    def stain(self, source: str, layout: str, token: str, fixed: str | None) -> str | None:
        """The learned stain of a token, else the fixed one; None when neither is known (or they conflict)."""
        if token in self.conflicts.get((source, layout), ()):
            return None
        table = self._learned.get((source, layout))
        if table:
            return table.get(token)    # a source with load_data: its mapping, never the fixed table's
        return fixed

    def to_json(self) -> dict:
        return {f"{source}|{layout}": table for (source, layout), table in self._learned.items() if table}
