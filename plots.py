"""The figures: Figure 4's loss curves from train.py's log.jsonl, and Table 4's statistics from eval_len.py.

    python plots.py out/fig4                  # redraw out/fig4/curves.png (a run or a sweep folder)

matplotlib is imported here only, with the headless Agg backend, so train.py and eval_len.py work
without a display and import this file only when they draw.
"""
import json
import sys
from pathlib import Path

import matplotlib

from checks import ArgumentParser, UserError, run_main

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

METRICS = (("clean_train_loss", "clean training loss (noise off)"), ("eval_loss", "held-out loss"))
LINESTYLES = ("-", "--", ":", "-.")
FIGSIZE, DPI = (10, 4), 100  # 1000 x 400 pixels
FEW = 20  # evaluation points up to which each one is marked
TABLE4 = (("chars", "mean length (characters)"), ("words", "mean length (words)"), ("rep_2", "2-gram repetition (%)"),
          ("rep_3", "3-gram repetition (%)"), ("rep_4", "4-gram repetition (%)"), ("log_diversity", "log-diversity"))


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curve_series(records):
    """{metric: (steps, values)} from log.jsonl records: the steps where the clean losses were measured
    (step 0: before finetuning)."""
    return {m: ([r["step"] for r in records if m in r], [r[m] for r in records if m in r]) for m, _ in METRICS}


def curves_figure(runs, title=None):
    """runs: [(alpha, noise kind, log records)] -> Figure 4 as a matplotlib Figure: one panel per clean
    loss, one colour per alpha, one line style per noise kind."""
    alphas = sorted({a for a, _, _ in runs})
    kinds = list(dict.fromkeys(k for _, k, _ in runs))
    fig, axes = plt.subplots(1, len(METRICS), figsize=FIGSIZE, dpi=DPI)
    for alpha, kind, records in runs:
        series = curve_series(records)
        style = dict(color=f"C{alphas.index(alpha) % 10}", linestyle=LINESTYLES[kinds.index(kind) % len(LINESTYLES)],
                     label=f"alpha {alpha:g}" + (f", {kind}" if len(kinds) > 1 else ""))
        for ax, (metric, _) in zip(axes, METRICS):
            # a short run has few points (a single one draws no line at all): mark each
            ax.plot(*series[metric], **style, marker="o" if len(series[metric][0]) <= FEW else None)
    for ax, (_, label) in zip(axes, METRICS):
        ax.set(xlabel="optimizer step", ylabel="loss per response token", title=label)
        ax.ticklabel_format(useOffset=False)  # "1.562" on the axis, not "1e-5 + 1.562" over it
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(runs, path, title=None):
    fig = curves_figure(runs, title)
    fig.savefig(path)
    plt.close(fig)


def write_curves(out, runs):
    """runs: [(alpha, kind, run folder)] -> OUT/curves.png from each folder's log.jsonl. One run is
    titled as one run: Figure 4 is the comparison of a sweep (--alpha 0 5)."""
    name = Path(out).resolve().name
    title = (f"{name}: clean losses of alpha {runs[0][0]:g} alone (Figure 4 compares a sweep: --alpha 0 5)"
             if len(runs) == 1 else f"{name}: clean losses (Figure 4)")
    plot_curves([(a, k, read_log(Path(d) / "log.jsonl")) for a, k, d in runs], Path(out) / "curves.png", title)


def table4_figure(results):
    """results: {file: eval_len.length_stats(...)} -> one bar chart per Table 4 statistic, the files
    side by side; a statistic that is undefined for a file (no response reached the cutoff) is marked
    n/a, not drawn as a zero bar."""
    names = list(results)
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    for ax, (key, label) in zip(axes.flat, TABLE4):
        values = [results[n][key] for n in names]
        ax.bar(range(len(names)), [0.0 if v is None else v for v in values],
               color=[f"C{i % 10}" for i in range(len(names))])
        for i, v in enumerate(values):
            if v is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(names)), [Path(n).stem for n in names], fontsize=7, rotation=20)
    fig.suptitle("Length, repetition and diversity of the responses (NEFTune Table 4)")
    fig.tight_layout()
    return fig


def plot_table4(results, path):
    fig = table4_figure(results)
    fig.savefig(path)
    plt.close(fig)


def write_sweep(out, results):
    lines = ["| alpha | noise | clean train loss | eval loss | tokens/s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['alpha']:g} | {r['noise']} | {r['clean_train_loss']:.4f} | {r['eval_loss']:.4f} "
                     f"| {r['tokens_per_s']:,.0f} |")
    (out / "sweep.md").write_text("Final clean (noise-off) losses per run; see each folder's log.jsonl "
                                  "for the curves.\n\n" + "\n".join(lines) + "\n")


def sweep_runs(out):
    """[(alpha, kind, folder)] of a sweep folder (alpha_<a>[_<kind>]/ as train.py names them)."""
    runs = []
    for log in sorted(Path(out).glob("alpha_*/log.jsonl")):
        alpha, _, kind = log.parent.name[len("alpha_"):].partition("_")
        runs.append((float(alpha), kind or "uniform", log.parent))
    return runs


def final_gaps(out, base=0.0):
    """Figure 4's signature in one sweep folder: for each alpha, its final clean training loss and
    held-out loss minus those of alpha `base` (positive train gap + negative eval gap = the signature)."""
    last = {(a, k): [r for r in read_log(Path(d) / "log.jsonl") if "eval_loss" in r][-1] for a, k, d in sweep_runs(out)}
    return {(a, k): {m: r[m] - last[(base, k)][m] for m, _ in METRICS} for (a, k), r in last.items() if a != base}


def plot_leaderboard(board, path):
    """judge.py's leaderboard: each generator's raw and length-controlled win rate with its error bar."""
    names = list(board)
    fig, ax = plt.subplots(figsize=(2.8 + 1.2 * len(names), 3.6))
    xs = list(range(len(names)))
    for shift, key, label in ((-0.18, "win_rate", "raw"), (0.18, "lc_win_rate", "length-controlled")):
        err = "standard_error" if key == "win_rate" else "lc_standard_error"
        ax.bar([x + shift for x in xs], [board[g][key] for g in names], 0.36, yerr=[board[g][err] for g in names],
               capsize=4, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(xs, names, rotation=15)
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate vs reference (%)")
    ax.legend(frameon=False, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv):
    p = ArgumentParser(prog="plots.py", description="Redraw OUT/curves.png of train.py sweep folders (--alpha 0 A "
                       "...) and print each alpha's final gaps to alpha 0; with several folders (seeds), their mean "
                       "and standard deviation.")
    p.add_argument("folders", nargs="+", help="sweep folders, each holding alpha_*/log.jsonl")
    folders = [Path(f) for f in p.parse_args(argv).folders]
    for f in folders:
        if not sweep_runs(f):
            raise UserError(f"{f}: not a sweep folder of train.py --alpha 0 A ... (no alpha_*/log.jsonl)")
    gaps = {}
    for out in folders:
        write_curves(out, sweep_runs(out))
        print(f"wrote {out / 'curves.png'}")
        for run, g in final_gaps(out).items():
            gaps.setdefault(run, []).append(g)
            print(f"{out}: alpha {run[0]:g} {run[1]}: clean train gap {g['clean_train_loss']:+.4f}, "
                  f"held-out gap {g['eval_loss']:+.4f}")
    for (alpha, kind), gs in gaps.items():
        summary = []
        for m, label in METRICS:
            xs = [g[m] for g in gs]
            mean = sum(xs) / len(xs)
            if len(xs) == 1:  # one run has no spread to show
                summary.append(f"{label} {mean:+.4f}")
                continue
            sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
            summary.append(f"{label} {mean:+.4f} +- {sd:.4f}")
        runs = f"over {len(gs)} runs" if len(gs) > 1 else "(one run: no spread)"
        print(f"alpha {alpha:g} {kind} - alpha 0 {runs}: " + ", ".join(summary))


def main(argv=None):
    return run_main("plots.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
