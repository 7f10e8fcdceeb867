"""`python -m bench.ceiling` end to end on a tiny dataset: a real daemon pinned to one core, rclone serve s3 over
http and https, per-thread CPU read from /proc; structure and positivity only (speed lives in BENCHMARKS.md)."""

from __future__ import annotations

import re
import shutil

import pytest

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone not installed (.[bench])")]


def test_ceiling_quick_prints_the_ceiling_and_writes_only_its_section(tmp_path, capsys):
    from bench.ceiling import MARK_END, MARK_START, main

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Other section\nkept as is\n\n## Reproduce\nrun it\n")
    argv = ["--quick", "--schemes", "http,https", "--transports", "obstore,aiohttp", "--workdir", str(tmp_path / "w"),
            "--markdown", str(md)]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = re.fullmatch(r"main_ms_per_field=([0-9.]+) ceiling_fps=([0-9]+)", out[-1])
    assert last, out[-1]
    main_ms, ceiling = float(last.group(1)), int(last.group(2))
    assert main_ms > 0 and ceiling == round(1000 / main_ms)
    runs = [line for line in out if re.match(r"(http|https)\s+(obstore|aiohttp)\s+off\s+cores=1", line)]
    assert len(runs) == 4, out   # both schemes × both transports, each with a positive fields/s
    assert all(float(re.search(r"([0-9.]+) fields/s", line).group(1)) > 0 for line in runs)

    text = md.read_text()
    assert text.count(MARK_START) == 1 and "kept as is" in text
    assert text.index(MARK_START) < text.index("## Reproduce")   # above the reproduce block
    assert (md.parent / "docs/img/bench_ceiling_cores.png").stat().st_size > 0
    assert main(argv[:-2] + ["--markdown", str(md)]) == 0        # a second run replaces its section
    assert md.read_text().count(MARK_START) == 1 and md.read_text().count(MARK_END) == 1


def test_regenerating_the_other_sections_keeps_the_ceiling_section(tmp_path):
    from bench.ceiling import MARK_END, MARK_START, carry_section

    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# old\n\n{MARK_START}\n## ceiling\nmain 0.5\n{MARK_END}\n\n## Reproduce\nold\n")
    fresh = "# new\n\n## Dataset fits\nrows\n\n## Reproduce\nnew"
    out = carry_section(md, fresh)
    assert out.startswith("# new") and "main 0.5" in out and "old" not in out.replace("# old", "")
    assert out.index("main 0.5") < out.index("## Reproduce")
    assert carry_section(tmp_path / "missing.md", fresh) == fresh
