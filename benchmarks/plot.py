"""Figures from the benchmark CSVs.

    python benchmarks/plot.py bench_out/*.csv --out docs/figures

One-GPU rows (world_size 1, from bench_ops.py), per GPU, dtype and N:
  ops_frac_*.png     fraction of the copy bandwidth measured in the same run, per op and provider, vs V_shard
  ops_speedup_*.png  how many times faster shardsoftmax is than each baseline, per op, at each V_shard
Multi-GPU rows (from bench_dist.py), per GPU, world size, dtype and N:
  dist*_ms_*.png     milliseconds per op and provider (max over ranks), per vocabulary size
The run's conditions (GPU, date, dtype, N, versions, commit, copy bandwidth) are written under each
figure. Where several CSVs hold the same measurement, the last file given wins.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

OURS = "shardsoftmax"


def load(paths: list[str]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if not r.get("ms"):
                    continue
                key = tuple(
                    r[c]
                    for c in ("gpu", "world_size", "op", "provider", "dtype", "n", "v_shard", "k", "pass")
                )
                rows[key] = r  # the last file wins
    return list(rows.values())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:40]


def panel_name(op: str, pass_: str, k: str) -> str:
    name = op if op not in ("softmax_stats", "local_stats", "allgather") else f"{op} k={k}"
    return name if pass_ == "fwd" and op != "cross_entropy" else f"{name} {pass_}"


PANEL_ORDER = ["softmax_stats", "local_stats", "cross_entropy", "softmax", "log_softmax", "allgather"]
PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def panel_key(p: tuple[str, str, str]) -> tuple:
    op, pass_, k = p
    return (PANEL_ORDER.index(op) if op in PANEL_ORDER else 99, int(k or 0), PASS_ORDER.get(pass_, 9))


def conditions(rows: list[dict], extra: str = "") -> str:
    r = rows[0]
    dates = sorted({x["date"][:10] for x in rows})
    copy = next((x for x in rows if x["op"] == "copy"), None)
    bw = f", copy bandwidth {float(copy['gb_s']):.0f} GB/s (read+write)" if copy and copy.get("gb_s") else ""
    return (
        f"{r['gpu']}, {', '.join(dates)}; {r['dtype']}, N={r['n']}{extra}; "
        f"torch {r['torch']}, triton {r['triton']}, commit {r['commit']}{bw}"
    )


def style(provider: str) -> dict:
    if provider == OURS:
        return {"color": "black", "linewidth": 2.5, "marker": "o", "zorder": 5}
    return {"linewidth": 1.2, "marker": ".", "alpha": 0.85}


def plot_ops(rows: list[dict], out: str, plt) -> list[str]:
    made = []
    copy_rows = defaultdict(list)
    for r in rows:
        if r["op"] == "copy":
            copy_rows[r["gpu"]].append(r)
    groups = defaultdict(list)
    for r in rows:
        if r["op"] not in ("copy", "matmul"):
            groups[(r["gpu"], r["dtype"], int(r["n"]))].append(r)
    for (gpu, dtype, n), rs in sorted(groups.items()):
        panels = sorted({(r["op"], r["pass"], r["k"]) for r in rs}, key=panel_key)
        note = conditions(rs + copy_rows[gpu][-1:])
        stem = f"{slug(gpu)}_{dtype}_N{n}"

        # fraction of the copy bandwidth vs V
        cols = min(4, len(panels))
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows + 0.6), squeeze=False)
        for ax, p in zip(axes.flat, panels):
            sel = [r for r in rs if (r["op"], r["pass"], r["k"]) == p and r.get("frac_of_copy_bw")]
            for prov in sorted({r["provider"] for r in sel}, key=lambda s: (s != OURS, s)):
                pts = sorted(
                    (int(r["v_shard"]), float(r["frac_of_copy_bw"])) for r in sel if r["provider"] == prov
                )
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=prov, **style(prov))
            ax.set_title(panel_name(*p), fontsize=10)
            ax.set_xlabel("V_shard")
            ax.set_ylabel("fraction of copy bandwidth")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(
            "Effective bandwidth (op's floor bytes / time) as a fraction of the copy bandwidth", fontsize=11
        )
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 0.96))
        path = os.path.join(out, f"ops_frac_{stem}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)

        # speed-up over each baseline, grouped by panel, one bar per (baseline, V)
        ours = {
            (r["op"], r["pass"], r["k"], r["v_shard"]): float(r["ms"]) for r in rs if r["provider"] == OURS
        }
        bars = defaultdict(dict)  # (panel) -> {(provider, v): speedup}
        for r in rs:
            key = (r["op"], r["pass"], r["k"], r["v_shard"])
            if r["provider"] != OURS and key in ours:
                bars[key[:3]][(r["provider"], int(r["v_shard"]))] = float(r["ms"]) / ours[key]
        bar_panels = [p for p in panels if p in bars]
        if not bar_panels:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(bar_panels) + 3), 4.8))
        series = sorted({pv for p in bar_panels for pv in bars[p]})
        width = 0.8 / max(1, len(series))
        cmap = plt.get_cmap("tab20")
        for i, (prov, v) in enumerate(series):
            xs = [
                j + (i - (len(series) - 1) / 2) * width
                for j, p in enumerate(bar_panels)
                if (prov, v) in bars[p]
            ]
            ys = [bars[p][(prov, v)] for p in bar_panels if (prov, v) in bars[p]]
            ax.bar(xs, ys, width, label=f"{prov}, V={v}", color=cmap(i % 20))
        ax.axhline(1.0, color="black", linewidth=0.8)
        values = [x for p in bar_panels for x in bars[p].values() if x > 0]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(bar_panels)))
        ax.set_xticklabels([panel_name(*p) for p in bar_panels], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("speed-up of shardsoftmax (baseline ms / ours)")
        ax.set_title("shardsoftmax vs each baseline (higher: shardsoftmax faster)", fontsize=11)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = os.path.join(out, f"ops_speedup_{stem}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def plot_dist(rows: list[dict], out: str, plt) -> list[str]:
    made = []
    groups = defaultdict(list)
    for r in rows:
        if r["op"] not in ("copy", "matmul"):
            groups[(r["gpu"], int(r["world_size"]), r["dtype"], int(r["n"]))].append(r)
    copy_rows = defaultdict(list)
    for r in rows:
        if r["op"] == "copy":
            copy_rows[(r["gpu"], int(r["world_size"]))].append(r)
    for (gpu, ws, dtype, n), rs in sorted(groups.items()):
        panels = sorted({(r["op"], r["pass"], r["k"]) for r in rs}, key=panel_key)
        vs = sorted({int(r["v_shard"]) for r in rs})
        cols = min(4, len(panels))
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows + 0.6), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for ax, p in zip(axes.flat, panels):
            sel = [r for r in rs if (r["op"], r["pass"], r["k"]) == p]
            provs = sorted({r["provider"] for r in sel}, key=lambda s: (s != OURS, s))
            width = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                pts = {int(r["v_shard"]): float(r["ms"]) for r in sel if r["provider"] == prov}
                xs = [j + (i - (len(provs) - 1) / 2) * width for j, v in enumerate(vs) if v in pts]
                ax.bar(xs, [pts[v] for v in vs if v in pts], width, label=prov,
                       color="black" if prov == OURS else cmap(i % 10))  # fmt: skip
            ax.set_xticks(range(len(vs)))
            ax.set_xticklabels([f"{v}\n(x{ws} ranks)" for v in vs], fontsize=8)
            ax.set_xlabel("V_shard (widest)")
            ax.set_ylabel("ms (max over ranks)")
            ax.set_title(panel_name(*p), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(f"{ws} ranks: time per call (lower is better)", fontsize=11)
        note = conditions(rs + copy_rows[(gpu, ws)][-1:], extra=f", {ws} ranks")
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 0.96))
        path = os.path.join(out, f"dist{ws}_ms_{slug(gpu)}_{dtype}_N{n}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="CSV files written by bench_ops.py / bench_dist.py")
    p.add_argument("--out", default=os.path.join("docs", "figures"), help="folder for the PNGs")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    rows = load(args.csv)
    if not rows:
        print("no rows with a time in the given CSVs", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    made = plot_ops([r for r in rows if r["world_size"] == "1"], args.out, plt)
    made += plot_dist([r for r in rows if r["world_size"] != "1"], args.out, plt)
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
