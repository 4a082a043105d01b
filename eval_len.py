"""Length, repetition and diversity of model responses, side by side: the statistics of the NEFTune
paper's Table 4, and with --refs the ROUGE-L / BLEU-4 overlap with the training responses (Figure 5).

    python eval_len.py A.json B.json ... [--cutoff 50] [--refs train.json] [--json] [--plot table4.png]
"""
import json
import math
import os
import sys
from collections import Counter

import plots
from checks import ArgumentParser, UserError, read_json, run_main

NGRAM_ORDERS = (2, 3, 4)  # the n-grams of Table 4's repetition and diversity


def mean(xs):
    return math.fsum(xs) / len(xs) if xs else None


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_repetition(tokens, n):
    """Percent of the n-grams that are repeats: 100 * (1 - unique / total).
    All len - n + 1 n-grams count. The SimCTG loop that Kirchenbauer et al. copied stops one n-gram
    early (`while end_idx < len`); we follow the stated definition rather than that slip."""
    grams = ngrams(tokens, n)
    return 100.0 * (1.0 - len(set(grams)) / len(grams))


def length_stats(texts, cutoff=50):
    """Table 4 for one model. Lengths use every response in full; repetition and diversity use the
    first `cutoff` whitespace tokens of the responses that have at least that many, so that a
    model is not judged more repetitive merely for writing longer answers."""
    if cutoff < max(NGRAM_ORDERS):
        raise ValueError(f"cutoff must be at least {max(NGRAM_ORDERS)}, got {cutoff}")
    words = [t.split() for t in texts]
    kept = [w[:cutoff] for w in words if len(w) >= cutoff]
    reps = {n: [] for n in NGRAM_ORDERS}
    diversity, log_diversity = [], []
    for tokens in kept:
        div = 1.0
        for n in NGRAM_ORDERS:
            rep = ngram_repetition(tokens, n)
            reps[n].append(rep)
            div *= 1.0 - rep / 100.0
        diversity.append(div)
        # Kirchenbauer et al. cap at 20 so a response with no repeats at all (div = 1) stays finite.
        log_diversity.append(-math.log(max(1.0 - div, math.exp(-20))))
    return {
        "n": len(texts),
        "chars": mean([len(t) for t in texts]),  # Python len: what AlpacaEval's length column counts
        "words": mean([len(w) for w in words]),
        **{f"rep_{n}": mean(reps[n]) for n in NGRAM_ORDERS},
        "diversity": mean(diversity),
        "log_diversity": mean(log_diversity),
        "n_cut": len(kept),
    }


def lcs_len(a, b):
    """Length of the longest common subsequence of token lists a and b, bit-parallel (Allison &
    Dix 1986; Hyyro 2004): one big-int step per token of b instead of a len(a) x len(b) table,
    which in pure Python is what keeps long chat responses fast. Bit i of v is 0 where the LCS
    grows at a[i]."""
    match = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate, reference):
    """ROUGE-L F1 of one pair over whitespace tokens (Lin 2004, with beta = 1)."""
    c, r = candidate.split(), reference.split()
    lcs = lcs_len(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(candidates, references, max_n=4):
    """Corpus BLEU (Papineni et al. 2002) over whitespace tokens, one reference each, uniform
    weights. Clipped matches and n-gram totals are summed over the whole corpus before dividing,
    so this is not the mean of sentence BLEUs. No smoothing: a zero precision gives 0."""
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        c, r = cand.split(), ref.split()
        cand_len, ref_len = cand_len + len(c), ref_len + len(r)
        for n in range(1, max_n + 1):
            # Counter & Counter keeps the smaller count: the clipping to the reference's count.
            matches[n - 1] += sum((Counter(ngrams(c, n)) & Counter(ngrams(r, n))).values())
            totals[n - 1] += max(len(c) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = math.fsum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
    return brevity * math.exp(log_precision)


def train_overlap(outputs, train):
    """Figure 5: how closely generations copy the training response to the same instruction.
    Generations whose instruction is not in the training set are skipped; n_refs counts the rest."""
    reference = {}
    for ex in train:
        reference.setdefault(ex["instruction"], ex["output"])  # a repeated instruction: first one wins
    pairs = [(o["output"], reference[o["instruction"]]) for o in outputs if o["instruction"] in reference]
    return {
        "rouge_l": mean([rouge_l(c, r) for c, r in pairs]),
        "bleu_4": corpus_bleu(*zip(*pairs)) if pairs else None,
        "n_refs": len(pairs),
    }


def load_records(path, keys):
    """A JSON list of objects whose `keys` are strings, or UserError in one line naming the file."""
    data = read_json(path)
    want = "not a JSON list of objects with " + " and ".join(f'"{k}"' for k in keys)
    if not isinstance(data, list):
        raise UserError(f"{path}: {want} (found a JSON {type(data).__name__})")
    if not data:
        raise UserError(f"{path}: empty list, no responses")
    for i, rec in enumerate(data):
        if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in keys)):
            raise UserError(f"{path}: {want} (item {i} is not)")
    return data


def row_labels(paths):
    """{path: its file name without the folder and .json}, or the paths themselves where two names clash."""
    stems = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
    clash = len(set(stems.values())) < len(stems)
    return {p: p if clash else stem for p, stem in stems.items()}


def print_table(results, cutoff):
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    has_refs = any("rouge_l" in s for s in results.values())
    labels = row_labels(results)
    width = max(len("file"), *map(len, labels.values()))
    head = f"{'file':<{width}}  {'n':>5}  {'chars':>7}  {'words':>6}  {'rep-2':>6}  {'rep-3':>6}  " \
           f"{'rep-4':>6}  {'log-div':>7}  {f'n>={cutoff}':>6}"
    if has_refs:
        head += f"  {'rouge-L':>7}  {'bleu-4':>6}  {'n_refs':>6}"
    print(head)
    for path, s in results.items():
        row = f"{labels[path]:<{width}}  {s['n']:>5}  {fmt(s['chars'], '7.1f')}  {fmt(s['words'], '6.1f')}"
        row += "".join(f"  {fmt(s[f'rep_{n}'], '6.2f'):>6}" for n in NGRAM_ORDERS)
        row += f"  {fmt(s['log_diversity'], '7.2f'):>7}  {s['n_cut']:>6}"
        if has_refs:
            row += f"  {fmt(s['rouge_l'], '7.4f'):>7}  {fmt(s['bleu_4'], '6.4f'):>6}  {s['n_refs']:>6}"
        print(row)


def run(argv):
    parser = ArgumentParser(
        prog="eval_len.py",
        description="Table 4 of NEFTune (Jain et al. 2023) for AlpacaEval output files: mean length "
                    "in characters and whitespace tokens, 2/3/4-gram repetition (%) and log-diversity.")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="AlpacaEval outputs: a JSON list of {instruction, output, generator, dataset}")
    parser.add_argument("--cutoff", type=int, default=50,
                        help="repetition and diversity use the first N whitespace tokens and leave out "
                             "shorter responses; the paper used 50 for Alpaca-trained models, 100 for "
                             "Evol-Instruct, 150 for ShareGPT and OpenPlatypus (default: 50)")
    parser.add_argument("--refs", metavar="TRAIN.json",
                        help="Alpaca-format training data ({instruction, input, output}): add the mean "
                             "ROUGE-L F1 and corpus BLEU-4 of each generation against the training "
                             "response to the same instruction (Figure 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON object keyed by file path")
    parser.add_argument("--plot", metavar="FIG.png", help="also draw the statistics side by side (png, pdf or svg)")
    args = parser.parse_args(argv)
    if args.cutoff < max(NGRAM_ORDERS):
        raise UserError(f"--cutoff must be at least {max(NGRAM_ORDERS)} (4-gram repetition)")
    if args.plot:  # checked before any work, so a typo does not cost a long evaluation
        folder = os.path.dirname(args.plot) or "."
        problem = ("the file name must end in .png, .pdf or .svg" if not args.plot.lower().endswith((".png", ".pdf",
                                                                                                     ".svg"))
                   else f"{folder} is not a writable folder" if not (os.path.isdir(folder) and os.access(folder,
                                                                                                         os.W_OK))
                   else "is a folder" if os.path.isdir(args.plot) else None)
        if problem:
            raise UserError(f"--plot {args.plot}: {problem}")

    train = load_records(args.refs, ("instruction", "output")) if args.refs else None
    keys = ("instruction", "output") if train else ("output",)
    results = {}
    for path in args.files:  # everything is read and checked before anything is printed
        outputs = load_records(path, keys)
        results[path] = length_stats([o["output"] for o in outputs], args.cutoff)
        if train:
            results[path].update(train_overlap(outputs, train))
            if not results[path]["n_refs"]:  # else a row of "-" with no reason
                print(f"eval_len.py: {path}: none of its {len(outputs)} instructions is in {args.refs}, so there is "
                      "no overlap to measure (n_refs 0): --refs must be the training file these outputs' model was "
                      "finetuned on, answering that file's own instructions (e.g. sample.py --prompts TRAIN.json)",
                      file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results, args.cutoff)
    if args.plot:
        plots.plot_table4(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def main(argv=None):
    return run_main("eval_len.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
