"""Win rates from AlpacaEval preferences (1: the reference is better, 2: the model's answer, 1.5: a tie,
soft values between): the raw win rate with its standard error, the length-controlled win rate (the
part of the win rate that length does not explain), paired differences between two models with
bootstrap intervals, position bias and consistency of a two-order judge, and agreement with a
published judge. judge.py writes them as OUT/leaderboard.json and .md:

    python judge.py --annotations annotations.json --out rescored/     # the win rates of any annotations
"""
import math

import torch

from checks import UserError

BOOTSTRAP = 500  # resamples of the instructions for the LC error bar and the paired intervals


def preferences(rows):
    """Rows with a preference -> float64 tensor in [1, 2]; AlpacaEval's legacy 0 is a tie."""
    return torch.tensor([1.5 if r["preference"] == 0 else float(r["preference"]) for r in rows], dtype=torch.float64)


def lc_fit(p, d, steps=50):
    """AlpacaEval's length_controlled_minimal, unpenalised: logit P(model wins) = theta + phi * tanh(d / sd(d)),
    d = reference length - model length, fit by Newton's method on soft labels p (maximum likelihood of
    each row as a win weighted p and a loss weighted 1 - p). Batched over leading dims -> theta, phi."""
    f = torch.tanh(d / d.std(-1, keepdim=True))
    theta, phi = torch.zeros(d.shape[:-1], dtype=d.dtype), torch.zeros(d.shape[:-1], dtype=d.dtype)
    for _ in range(steps):
        s = torch.sigmoid(theta[..., None] + phi[..., None] * f)
        g0, g1 = (s - p).sum(-1), ((s - p) * f).sum(-1)
        w = s * (1 - s) + 1e-12
        h00, h01, h11 = w.sum(-1), (w * f).sum(-1), (w * f * f).sum(-1)
        det = h00 * h11 - h01 * h01
        step0, step1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det  # the 2 x 2 Newton step
        theta, phi = (theta - step0).clamp(-40, 40), (phi - step1).clamp(-40, 40)  # clamp: all wins or losses
        if not (step0.abs().nan_to_num().max() > 1e-12 or step1.abs().nan_to_num().max() > 1e-12):
            break
    return theta, phi


def lc_win_rate(p, d):
    return 100 * torch.sigmoid(lc_fit(p, d)[0])


def resamples(n, seed=0, count=BOOTSTRAP):
    return torch.randint(n, (count, n), generator=torch.Generator().manual_seed(seed))


def length_difference(rows):
    return torch.tensor([len(r["output_1"]) - len(r["output_2"]) for r in rows], dtype=torch.float64)


def position_bias(rows):
    """Mean share of the first position's label over both orders of our judge's rows (0.5: none)."""
    first = [(1 - r["p_model_order_1"] + r["p_model_order_2"]) / 2 for r in rows
             if r.get("p_model_order_1") is not None]
    return sum(first) / len(first) if first else None


def win_rates(rows, name):
    """One generator's annotation rows -> the leaderboard entry (see docs/evaluation.md for each key)."""
    rows = [r for r in rows if r.get("preference") is not None]
    if len(rows) < 2:
        raise UserError(f"{name}: {len(rows)} row(s) with a preference; a win rate needs at least 2")
    pref, d = preferences(rows), length_difference(rows)
    if d.std() == 0:
        raise UserError(f"{name}: every answer is as long as its reference's minus {d[0]:g} characters (sd of the "
                        "length difference 0): the length-controlled fit is undefined")
    p = pref - 1
    wins, draws = int((pref > 1.5).sum()), int((pref == 1.5).sum())
    lc_boot = lc_win_rate(p[idx := resamples(len(rows))], d[idx])
    decided = d != 0
    longer_won = torch.where(d < 0, p, 1 - p)[decided]  # d < 0: the model's answer is the longer
    ours = [r for r in rows if r.get("p_model_order_1") is not None]
    agree = [(r["p_model_order_1"] > 0.5) == (r["p_model_order_2"] > 0.5) for r in ours]
    return {"win_rate": 100 * p.mean().item(), "standard_error": 100 * p.std().item() / math.sqrt(len(p)),
            "discrete_win_rate": 100 * (wins + draws / 2) / len(p), "n_wins": wins, "n_draws": draws,
            "n_total": len(p), "lc_win_rate": lc_win_rate(p, d).item(),
            "lc_standard_error": lc_boot[lc_boot.isfinite()].std().item(),
            "avg_length": sum(len(r["output_2"]) for r in rows) / len(rows),
            "p_longer": longer_won.mean().item() if decided.any() else None,
            "p_first": position_bias(ours),
            "consistency": sum(agree) / len(agree) if ours else None,
            "truncated": sum(bool(r.get("truncated")) for r in rows)}


def paired(rows_a, rows_b):
    """Generator a minus b on the instructions both have preferences for: raw and LC win rates, each
    with a bootstrap 95% interval from the same resampled instructions."""
    b = {r["instruction"]: r for r in rows_b if r.get("preference") is not None}
    both = [(r, b[r["instruction"]]) for r in rows_a if r.get("preference") is not None and r["instruction"] in b]
    if len(both) < 2:
        return None
    (pa, da), (pb, db) = [(preferences(x) - 1, length_difference(x)) for x in zip(*both)]
    idx = resamples(len(both), seed=1)
    out = {"n": len(both)}
    for key, f in (("win_rate", lambda p, d: 100 * p.mean(-1)), ("lc_win_rate", lc_win_rate)):
        diff, boot = f(pa, da) - f(pb, db), f(pa[idx], da[idx]) - f(pb[idx], db[idx])
        boot = boot[boot.isfinite()]
        out[key] = diff.item()
        out[key + "_ci95"] = [boot.quantile(0.025).item(), boot.quantile(0.975).item()]
    return out


def leaderboard(by_generator):
    """{generator: rows} -> {generator: entry}; with two or more, each entry's "minus" holds its paired
    differences from the generators listed after it."""
    board = {g: win_rates(rows, g) for g, rows in by_generator.items()}
    names = list(by_generator)
    for i, a in enumerate(names):
        diffs = {b: paired(by_generator[a], by_generator[b]) for b in names[i + 1:]}
        if any(diffs.values()):
            board[a]["minus"] = {b: v for b, v in diffs.items() if v}
    return board


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def leaderboard_md(board, note=""):
    lines = ["| generator | win rate | LC win rate | discrete | wins / draws / n | avg length | p_longer | p_first "
             "| consistency | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, e in board.items():
        lines.append(f"| {g} | {e['win_rate']:.2f} ± {e['standard_error']:.2f} | {e['lc_win_rate']:.2f} ± "
                     f"{e['lc_standard_error']:.2f} | {e['discrete_win_rate']:.2f} | {e['n_wins']} / {e['n_draws']} / "
                     f"{e['n_total']} | {e['avg_length']:.0f} | {fmt(e['p_longer'], '.3f')} | "
                     f"{fmt(e['p_first'], '.3f')} | {fmt(e['consistency'], '.3f')} | {e['truncated']} |")
    for a, e in board.items():
        for b, d in e.get("minus", {}).items():
            lines.append(f"\n{a} minus {b} ({d['n']} instructions): win rate {d['win_rate']:+.2f} "
                         f"[{d['win_rate_ci95'][0]:+.2f}, {d['win_rate_ci95'][1]:+.2f}], LC win rate "
                         f"{d['lc_win_rate']:+.2f} [{d['lc_win_rate_ci95'][0]:+.2f}, {d['lc_win_rate_ci95'][1]:+.2f}] "
                         "(bootstrap 95%)")
    return "\n".join(lines) + "\n" + note


def agreement(rows, ours):
    """How our preferences (one per row, None where not judged) agree with a published file's, beside
    what "always the longer answer" reaches on the same rows. Rounded agreement leaves ties out."""
    def side(p):  # 1: output_2 preferred, -1: output_1, 0: a tie
        return (p > 1.5) - (p < 1.5)
    both = [(r, 1.5 if r["preference"] == 0 else float(r["preference"]), q) for r, q in zip(rows, ours)
            if r.get("preference") is not None and q is not None]
    longer = [side(1.5 + len(r["output_2"]) - len(r["output_1"])) for r, _, _ in both]

    def share(pairs):
        pairs = [a == b for a, b in pairs if a and b]
        return (sum(pairs) / len(pairs) if pairs else None), len(pairs)
    (agree, n), (lagree, ln) = (share([(side(q), side(p)) for _, p, q in both]),
                                share([(side(p), s) for (_, p, _), s in zip(both, longer)]))
    # "always the longer answer" agrees with the published judge exactly as often as it picks the longer one
    return {"n": len(both), "agreement": agree, "n_decisive": n,
            "soft_agreement": sum(1 - abs(q - p) for _, p, q in both) / len(both) if both else None,
            "longer_answer_agreement": lagree, "n_longer_decisive": ln,
            "ours_picks_longer": share([(side(q), s) for (_, _, q), s in zip(both, longer)])[0]}
