"""The built-in facts data, OUT/curves.png, plots.py's gaps, eval_len.py --plot."""
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import call

import builtin_data
import eval_len
import plots

ROOT = Path(__file__).resolve().parents[1]


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, which must come first after the 8-byte signature."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind, width, height = struct.unpack(">I4sII", head[8:24])
    assert (length, kind) == (13, b"IHDR")
    return width, height


FIG_PIXELS = (plots.FIGSIZE[0] * plots.DPI, plots.FIGSIZE[1] * plots.DPI)


# ---------------------------------------------------------------- the facts data

def test_builtin_facts_hold_facts_the_prompt_cannot_give():
    records = builtin_data.builtin_records(seed=5, n=1600, kind="facts")
    made = lambda seed: builtin_data.builtin_records(seed=seed, n=1600, kind="facts")
    assert records == made(5) != made(6)
    # the default is unchanged
    assert builtin_data.builtin_records(seed=5, n=50) == builtin_data.builtin_records(seed=5, n=50, kind="tasks")
    facts = Counter()
    for user, answer in records:
        name = re.fullmatch(r"(?:Who is (\w+)\?|Tell me about (\w+)\.|Describe this person\.)", user["content"])
        name = name.group(1) or name.group(2) or user["input"]
        m = re.fullmatch(rf"{name} is a (\w+) from (\w+) who likes (\w+)\.", answer["content"])
        assert m, (user, answer)
        facts.update(zip(("job", "city", "likes"), m.groups()))
    # every fact is drawn uniformly from its list, whatever the name: 1600/16 = 100 expected per value
    for key, values in (("job", builtin_data.JOBS), ("city", builtin_data.CITIES), ("likes", builtin_data.LIKES)):
        counts = [facts[(key, v)] for v in values]
        assert sum(counts) == 1600 and min(counts) > 50 and max(counts) < 150, (key, counts)


# ---------------------------------------------------------------- curves

def fake_log(seed, steps=12, eval_every=4):
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 3.0 - 0.1 * s + 0.01 * seed}
        if s % eval_every == 0:
            r |= {"clean_train_loss": 2.5 - 0.1 * s - 0.001 * seed, "eval_loss": 2.6 - 0.05 * s + 0.002 * seed}
        out.append(r)
    return out


def drawn_curves(runs, fig):
    """{(alpha, kind): {metric: (steps, values), "color", "linestyle"}} read back from the figure's lines,
    which curves_figure draws in the order of `runs`, one per panel."""
    drawn = {}
    for ax, (metric, _) in zip(fig.axes, plots.METRICS):
        for (alpha, kind, _), line in zip(runs, ax.get_lines()):
            d = drawn.setdefault((alpha, kind), {"color": line.get_color(), "linestyle": line.get_linestyle()})
            d[metric] = tuple(list(v) for v in line.get_data())
    plots.plt.close(fig)
    return drawn


def test_plot_curves_draws_the_logged_numbers(tmp_path):
    runs = [(a, k, fake_log(i)) for i, (a, k) in enumerate([(0.0, "uniform"), (5.0, "uniform"), (5.0, "gaussian"),
                                                            (15.0, "gaussian")])]
    plots.plot_curves(runs, tmp_path / "curves.png")
    assert png_size(tmp_path / "curves.png") == FIG_PIXELS
    drawn = drawn_curves(runs, plots.curves_figure(runs))
    for i, (alpha, kind, _) in enumerate(runs):
        got = drawn[(alpha, kind)]
        assert got["clean_train_loss"] == ([4, 8, 12], [2.5 - 0.1 * s - 0.001 * i for s in (4, 8, 12)])
        assert got["eval_loss"] == ([4, 8, 12], [2.6 - 0.05 * s + 0.002 * i for s in (4, 8, 12)])
    # one colour per alpha, one line style per noise kind
    colour = {a: {drawn[(a, k)]["color"] for aa, k, _ in runs if aa == a} for a, _, _ in runs}
    assert all(len(c) == 1 for c in colour.values()) and len({c.pop() for c in colour.values()}) == 3
    style = {run: d["linestyle"] for run, d in drawn.items()}
    assert style[(5.0, "uniform")] == style[(0.0, "uniform")] != style[(5.0, "gaussian")] == style[(15.0, "gaussian")]


def test_few_evaluation_points_are_drawn_and_readable(tmp_path, monkeypatch):
    # a run shorter than --eval-every: a lone point (an older log without step 0), or step 0 and its last
    # step with losses 1e-7 apart, which matplotlib would label "1e-7+1.562" above the axis
    lone = [{"step": s, "loss": 2.0} for s in range(1, 18)] + [{"step": 18, "loss": 2.0, "clean_train_loss": 1.5620001,
                                                                "eval_loss": 1.5620003}]
    two = [{"step": 0, "clean_train_loss": 1.5620001, "eval_loss": 1.5620003}] + lone[:-1] + [
        {"step": 18, "loss": 2.0, "clean_train_loss": 1.5620002, "eval_loss": 1.5620005}]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # plot_curves draws, saves, then hands the figure here
    for records, steps, values in ((lone, [18], [1.5620003]), (two, [0, 18], [1.5620003, 1.5620005])):
        plots.plot_curves([(5.0, "uniform", records)], tmp_path / "curves.png")
        for ax in figures[-1].axes:
            assert [line.get_marker() for line in ax.lines] == ["o"]  # a lone point is visible
            assert ax.yaxis.get_major_formatter().get_offset() == ""  # set when drawn: savefig drew it
        assert list(map(list, figures[-1].axes[1].lines[0].get_data())) == [steps, values]
    many = [{"step": s, "eval_loss": 1.0, "clean_train_loss": 1.0} for s in range(30)]
    plots.plot_curves([(5.0, "uniform", many)], tmp_path / "many.png")
    assert figures[-1].axes[0].lines[0].get_marker() == "None"  # a long curve is a plain line


def test_final_gaps(tmp_path):
    for alpha, seed in ((0, 0), (5, 10)):
        (tmp_path / f"alpha_{alpha}").mkdir()
        (tmp_path / f"alpha_{alpha}" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_log(seed)))
    assert [(a, k) for a, k, _ in plots.sweep_runs(tmp_path)] == [(0.0, "uniform"), (5.0, "uniform")]
    gaps = plots.final_gaps(tmp_path)[(5.0, "uniform")]
    assert gaps["clean_train_loss"] == pytest.approx(-0.010) and gaps["eval_loss"] == pytest.approx(0.020)


@pytest.mark.slow
def test_train_sweep_writes_curves(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "--recipe", "fig4", "--builtin-size", "60", "--dim", "32", "--n-layers", "1",
           "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "4", "--eval-every", "2", "--eval-examples",
           "8",
           "--alpha", "0", "5", "--noise", "uniform", "gaussian", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [(a, k, out / f"alpha_{a:g}_{k}") for k in ("uniform", "gaussian") for a in (0.0, 5.0)]
    for _, _, d in runs:  # every run has its own figure ...
        assert png_size(d / "curves.png") == FIG_PIXELS
    assert png_size(out / "curves.png") == FIG_PIXELS  # ... and the sweep one with all four
    logs = [(a, k, plots.read_log(d / "log.jsonl")) for a, k, d in runs]
    drawn = drawn_curves(logs, plots.curves_figure(logs))
    for a, k, d in runs:
        logged = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        for metric in ("eval_loss", "clean_train_loss"):
            # step 0: the loss before training, the baseline
            assert drawn[(a, k)][metric] == ([0, 2, 4], [r[metric] for r in logged if r["step"] in (0, 2, 4)])


# ---------------------------------------------------------------- eval_len.py --plot

def outputs(path, texts):
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": t, "generator": "m", "dataset": "d"} for i,
                                t in enumerate(texts)]))
    return str(path)


def test_plot_table4_draws_the_statistics(tmp_path):
    long = " ".join(f"w{i % 7}" for i in range(60))
    results = {"a.json": eval_len.length_stats(["one two three", long], cutoff=50),
               "b.json": eval_len.length_stats(["short"], cutoff=50)}
    plots.plot_table4(results, tmp_path / "t4.png")
    assert png_size(tmp_path / "t4.png") == FIG_PIXELS
    fig = plots.table4_figure(results)
    drawn = {key: [b.get_height() for b in ax.patches] for ax, (key, _) in zip(fig.axes, plots.TABLE4)}
    marked = sorted((key, int(t.get_position()[0])) for ax, (key, _) in zip(fig.axes, plots.TABLE4)
                    for t in ax.texts if t.get_text() == "n/a")
    plots.plt.close(fig)
    assert drawn["chars"] == [pytest.approx((13 + len(long)) / 2), pytest.approx(5.0)]
    assert drawn["words"] == [pytest.approx(31.5), pytest.approx(1.0)]
    # 50 tokens cycling through 7 words: 7 distinct 2-grams of 49
    assert drawn["rep_2"] == [pytest.approx(100 * (1 - 7 / 49)), 0.0]  # b has no response of >= 50 words: ...
    assert marked == [("log_diversity", 1), ("rep_2", 1), ("rep_3", 1), ("rep_4", 1)]  # ... marked n/a on the figure


def test_eval_len_plot_cli(tmp_path):
    a = outputs(tmp_path / "a.json", ["alpha beta gamma " * 20, "one two"])
    b = outputs(tmp_path / "b.json", ["x y z"])
    p = call(eval_len.main, a, b, "--plot", tmp_path / "t4.png")
    assert p.returncode == 0, p.stderr
    assert png_size(tmp_path / "t4.png") == FIG_PIXELS and f"wrote {tmp_path / 't4.png'}" in p.stderr
    for bad, why in ((tmp_path / "missing" / "t4.png", "not a writable folder"), (tmp_path / "t4.txt", "must end in"),
                     (tmp_path / "a.json" / "t4.png", "not a writable folder")):
        p = call(eval_len.main, a, "--plot", bad)
        assert p.returncode == 2 and p.stdout == "" and why in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_plots_cli_gaps_and_spread(tmp_path, capsys):
    for seed_dir, seeds in (("s1", (0, 10)), ("s2", (1, 12))):
        for alpha, seed in zip((0, 5), seeds):
            (tmp_path / seed_dir / f"alpha_{alpha}").mkdir(parents=True)
            log = "".join(json.dumps(r) + "\n" for r in fake_log(seed))
            (tmp_path / seed_dir / f"alpha_{alpha}" / "log.jsonl").write_text(log)
    one = call(plots.main, tmp_path / "s1")
    assert one.returncode == 0 and "+-" not in one.stdout and "(one run: no spread)" in one.stdout  # no fake 0.0000
    assert f"wrote {tmp_path / 's1' / 'curves.png'}" in one.stdout
    both = call(plots.main, tmp_path / "s1", tmp_path / "s2")
    g1, g2 = (plots.final_gaps(tmp_path / s)[(5.0, "uniform")]["eval_loss"] for s in ("s1", "s2"))
    mean, sd = (g1 + g2) / 2, abs(g1 - g2) / 2 ** 0.5  # the sample standard deviation of two numbers
    assert f"held-out loss {mean:+.4f} +- {sd:.4f}" in both.stdout and "over 2 runs" in both.stdout
    bad = call(plots.main, tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith(f"plots.py: error: {tmp_path}: not a sweep folder")
    assert call(plots.main, "--help").returncode == 0
