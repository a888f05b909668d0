"""Span labels on the shared SQuAD v1.1 train sample: do the job's labels decode back to the gold text?

Runs the job's own ``train_features`` (labels) and ``eval_features`` (context-only offsets, what the
decoder reads) on the same rows with the MiniLM uncased WordPiece tokenizer at 384/128, and prints:

- windows, labelled windows (not CLS), labelled windows whose offsets decode to exactly the gold
  text, and every one that does not, with a classification of why;
- a cross-check against an independent reference labeller (first/last context token that overlaps
  the whitespace-trimmed gold span, and "whole answer inside the window's context");
- examples with no window carrying their answer ("lost"), each with a reason;
- preprocessing rows/s.

Usage: python bench/labels.py [--limit N] [--max-length 384] [--stride 128] [--show 50]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import TRAIN_FILE, data_dir, data_file, header, minilm_path, read_rows

INFERRED_FILE = "squad_v1_train_sample_inferred_starts.tsv"


def inferred_starts() -> dict[str, int]:
    """Ids whose answer_start the data README says was inferred (answer text occurs several times)."""
    path = data_dir() / INFERRED_FILE
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def whole_word_elsewhere(context: str, gold: str, chosen: int) -> str:
    """For an inferred answer_start inside a word: is there an occurrence on word boundaries instead?"""
    def whole(i: int) -> bool:
        before = context[i - 1] if i > 0 else " "
        after = context[i + len(gold)] if i + len(gold) < len(context) else " "
        return not before.isalnum() and not after.isalnum()

    others = [i for i in range(len(context)) if context.startswith(gold, i) and i != chosen and whole(i)]
    if others:
        return f"; a whole-word occurrence exists at char {others[0]}: the builder likely picked the wrong occurrence"
    return "; no whole-word occurrence elsewhere"


def whitespace_probe(tokenizer) -> list[str]:
    """label_window on hand-made gold spans with surrounding whitespace (none occur in the shared samples)."""
    from job.squad.features import label_window

    question, context = "Who won?", "The Denver Broncos won the game."
    enc = tokenizer(question, context, return_offsets_mapping=True)
    offsets, seq = enc["offset_mapping"], enc.sequence_ids()
    lines = []
    for start, gold in ((4, "Denver"), (3, " Denver"), (4, "Denver "), (4, "Denv")):
        s, e = label_window(offsets, seq, start, start + len(gold))
        decoded = context[offsets[s][0]:offsets[e][1]]
        verdict = "ok" if decoded == gold.strip() else ("wider: the gold cuts a word (inherent)" if gold.strip() == gold
                                                          else "WRONG: whitespace pulls in a neighbouring token")
        lines.append(f"  gold {gold!r:10} -> label {(s, e)} decodes to {decoded!r:18} {verdict}")
    return lines


def token_cover(offsets, seq, a_s: int, a_e: int) -> tuple[int | None, int | None]:
    """First and last context token overlapping the characters [a_s, a_e)."""
    hit = [t for t, (o, s) in enumerate(zip(offsets, seq)) if s == 1 and o[1] > a_s and o[0] < a_e and o[1] > o[0]]
    return (hit[0], hit[-1]) if hit else (None, None)


def reference_label(offsets, seq, a_s: int, a_e: int, cls: int) -> tuple[int, int]:
    """An independent labeller: the trimmed answer must lie wholly inside the window's context."""
    context = [t for t, s in enumerate(seq) if s == 1]
    if not context or a_e <= a_s:
        return cls, cls
    if offsets[context[0]][0] > a_s or offsets[context[-1]][1] < a_e:
        return cls, cls
    s, e = token_cover(offsets, seq, a_s, a_e)
    return (s, e) if s is not None else (cls, cls)


def classify(context: str, gold: str, a_s: int, a_e: int, offsets, seq, s: int, e: int) -> str:
    """Why the decoded label text differs from the gold text."""
    decoded = context[offsets[s][0]:offsets[e][1]]
    reasons = []
    lead = len(gold) - len(gold.lstrip())
    trail = len(gold) - len(gold.rstrip())
    if lead:
        reasons.append(f"gold has {lead} leading whitespace char(s)")
    if trail:
        reasons.append(f"gold has {trail} trailing whitespace char(s)")
    if decoded == gold.strip():
        return "; ".join(reasons) + " -> decoded is the trimmed gold (tokens never cover whitespace)"
    ts, te = a_s + lead, a_e - trail  # the trimmed gold span
    ctx = [t for t, x in enumerate(seq) if x == 1]
    # a gold boundary strictly inside a token: the token span is necessarily wider than the answer
    inside_start = [t for t in ctx if offsets[t][0] < ts < offsets[t][1]]
    inside_end = [t for t in ctx if offsets[t][0] < te < offsets[t][1]]
    if inside_start:
        t = inside_start[0]
        reasons.append(f"gold starts inside token {context[offsets[t][0]:offsets[t][1]]!r} (char {ts - offsets[t][0]} of it)")
    if inside_end:
        t = inside_end[0]
        reasons.append(f"gold ends inside token {context[offsets[t][0]:offsets[t][1]]!r} (char {te - offsets[t][0]} of it)")
    # the label starts before / ends after every token the (trimmed) answer overlaps
    rs, re_ = token_cover(offsets, seq, ts, te)
    if rs is not None and s < rs:
        reasons.append(f"LABEL STARTS {rs - s} token(s) EARLY: label_window picked {context[offsets[s][0]:offsets[s][1]]!r}, "
                       f"the first token of the answer is {context[offsets[rs][0]:offsets[rs][1]]!r}")
    if re_ is not None and e > re_:
        reasons.append(f"LABEL ENDS {e - re_} token(s) LATE: label_window picked {context[offsets[e][0]:offsets[e][1]]!r}, "
                       f"the last token of the answer is {context[offsets[re_][0]:offsets[re_][1]]!r}")
    if rs is not None and (s > rs or e < re_):
        reasons.append("LABEL NARROWER THAN THE ANSWER")
    return "; ".join(reasons) or "unexplained"


def bucket(reason: str) -> str:
    """Short class names for the summary table."""
    if "EARLY" in reason or "LATE" in reason or "NARROWER" in reason or reason == "unexplained":
        kind = "label_window picks a wrong token"
        if "leading whitespace" in reason:
            kind += " (gold starts with whitespace)"
        elif "trailing whitespace" in reason:
            kind += " (gold ends with whitespace)"
        return kind
    if "decoded is the trimmed gold" in reason:
        return "gold has surrounding whitespace; decoded = trimmed gold"
    if "starts inside" in reason and "ends inside" in reason:
        return "gold starts and ends inside a token (wider span, inherent)"
    if "starts inside" in reason:
        return "gold starts inside a token (wider span, inherent)"
    if "ends inside" in reason:
        return "gold ends inside a token (wider span, inherent)"
    return reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--show", type=int, default=100, help="print at most this many mismatches / lost examples")
    args = parser.parse_args()

    path = data_file(TRAIN_FILE)
    header("bench/labels.py: span labels round trip")
    from transformers import AutoTokenizer

    from job.squad.features import eval_features, train_features
    from job.squad.metrics import exact

    rows = read_rows(path, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    print(f"rows: {len(rows)} from {path.name}; tokenizer {type(tokenizer).__name__} (MiniLM, uncased WordPiece), "
          f"max_length {args.max_length}, stride {args.stride}")

    t0 = time.perf_counter()
    train = train_features(tokenizer, rows, args.max_length, args.stride)
    t1 = time.perf_counter()
    evals = eval_features(tokenizer, rows, args.max_length, args.stride)
    t2 = time.perf_counter()
    n = len(train["input_ids"])
    if n != len(evals["input_ids"]) or any(a != b for a, b in zip(train["input_ids"], evals["input_ids"])):
        print("FAIL: train_features and eval_features produced different windows; cannot pair labels with offsets")
        return 1

    cls_id = tokenizer.cls_token_id
    inferred = inferred_starts()
    by_example = collections.defaultdict(list)
    for w, ex in enumerate(evals["example_index"]):
        by_example[ex].append(w)

    labelled = exact_ok = 0
    mismatches, classes = [], collections.Counter()
    norm_ok = 0  # mismatches that still score EM 1 under the official normalisation
    ref_disagree = []  # (window, job label, reference label)
    carried = set()
    # the job pairs offsets with the tokenizer's sequence ids; eval offsets are [-1, -1] outside the context
    for w in range(n):
        ex = evals["example_index"][w]
        row = rows[ex]
        gold, a_s = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        a_e = a_s + len(gold)
        offsets = evals["offset_mapping"][w]
        seq = [1 if o[0] >= 0 else None for o in offsets]
        ids = train["input_ids"][w]
        cls = ids.index(cls_id) if cls_id in ids else 0
        s, e = train["start_positions"][w], train["end_positions"][w]
        lead = len(gold) - len(gold.lstrip())
        trail = len(gold) - len(gold.rstrip())
        ref = reference_label(offsets, seq, a_s + lead, a_e - trail, cls)
        if (s, e) != ref:
            ref_disagree.append((w, (s, e), ref))
        if (s, e) == (cls, cls):
            continue
        labelled += 1
        carried.add(ex)
        context = row["context"]
        if offsets[s][0] < 0 or offsets[e][0] < 0:
            decoded, reason = "<label outside the context>", "LABEL OUTSIDE THE CONTEXT"
        else:
            decoded = context[offsets[s][0]:offsets[e][1]]
            if decoded == gold:
                exact_ok += 1
                continue
            reason = classify(context, gold, a_s, a_e, offsets, seq, s, e)
        norm_ok += exact(decoded, gold) == 1.0
        if row["id"] in inferred:
            reason += (f"; answer_start was INFERRED by the data builder ({inferred[row['id']]} occurrences of the text)"
                       + whole_word_elsewhere(context, gold, a_s))
        if "builder likely picked" in reason:
            tag = " [answer_start inferred by the data builder; a whole-word occurrence exists: data issue]"
        elif row["id"] in inferred:
            tag = " [answer_start inferred; no whole-word occurrence]"
        else:
            tag = " [real annotation]"
        classes[bucket(reason) + tag] += 1
        mismatches.append((row["id"], gold, decoded, reason, float(exact(decoded, gold))))

    lost = [ex for ex in range(len(rows)) if ex not in carried]

    print()
    print(f"windows total:                         {n}")
    print(f"labelled windows (not CLS):            {labelled}")
    print(f"windows labelled CLS:                  {n - labelled}")
    print(f"labelled, decode == gold exactly:      {exact_ok}")
    print(f"labelled, decode != gold:              {len(mismatches)}  "
          f"(of which {norm_ok} still score EM=1 under SQuAD normalisation)")
    print(f"examples with no labelled window:      {len(lost)}")
    print(f"windows where the job's label != the reference labeller: {len(ref_disagree)}")

    if classes:
        print("\nmismatch classes:")
        for name, count in classes.most_common():
            print(f"  {count:5d}  {name}")
    if mismatches:
        print(f"\nmismatches (first {args.show}):")
        for rid, gold, decoded, reason, em in mismatches[:args.show]:
            print(f"  id={rid} gold={gold!r} decoded={decoded!r} EM={em:.0f}\n      why: {reason}")
    if ref_disagree:
        print(f"\nreference disagreements (first {args.show}):")
        for w, got, ref in ref_disagree[:args.show]:
            row = rows[evals["example_index"][w]]
            offs = evals["offset_mapping"][w]
            show = lambda p: "CLS" if p[0] == p[1] and offs[p[0]][0] < 0 else repr(row["context"][offs[p[0]][0]:offs[p[1]][1]])
            print(f"  window {w} id={row['id']} gold={row['answers']['text'][0]!r}: job {got} {show(got)} vs reference {ref} {show(ref)}")

    if lost:
        print(f"\nlost examples (first {args.show}):")
        for ex in lost[:args.show]:
            row = rows[ex]
            gold, a_s = row["answers"]["text"][0], row["answers"]["answer_start"][0]
            print(f"  id={row['id']} gold={gold[:80]!r}: {lost_reason(tokenizer, row, evals, by_example[ex], args)}")

    print("\nlabel_window on hand-made gold spans with surrounding whitespace (the shared samples have none):")
    print("\n".join(whitespace_probe(tokenizer)))

    total = t2 - t0
    print()
    print(f"train_features: {len(rows)} rows in {t1 - t0:.2f} s = {len(rows) / (t1 - t0):,.0f} rows/s")
    print(f"eval_features:  {len(rows)} rows in {t2 - t1:.2f} s = {len(rows) / (t2 - t1):,.0f} rows/s")
    print(f"both:           {len(rows)} rows in {total:.2f} s = {len(rows) / total:,.0f} rows/s "
          f"({n / len(rows):.3f} windows per row)")
    faults = sum(1 for m in mismatches if bucket(m[3]).startswith("label_window")) + len(ref_disagree)
    inherent = len(mismatches) - sum(1 for m in mismatches if bucket(m[3]).startswith("label_window"))
    print(f"\nRESULT: decode!=gold {len(mismatches)} (inherent tokenisation boundary: {inherent}, "
          f"label_window faults: {faults}), lost {len(lost)}, reference disagreements {len(ref_disagree)}"
          f" -> {'OK: no label_window fault on this data' if faults == 0 and not lost else 'CHECK'}")
    return 0


def lost_reason(tokenizer, row, evals, windows, args) -> str:
    gold, a_s = row["answers"]["text"][0], row["answers"]["answer_start"][0]
    a_e = a_s + len(gold)
    if not gold.strip():
        return "the gold answer is only whitespace"
    enc = tokenizer(row["context"], add_special_tokens=False, return_offsets_mapping=True)
    toks = [t for t, o in enumerate(enc["offset_mapping"]) if o[1] > a_s and o[0] < a_e]
    q = len(tokenizer(row["question"].lstrip(), add_special_tokens=False)["input_ids"])
    budget = args.max_length - q - 3
    spans = []
    for w in windows:
        ctx = [o for o in evals["offset_mapping"][w] if o[0] >= 0]
        spans.append((ctx[0][0], ctx[-1][1]) if ctx else None)
    if not toks:
        return "no context token overlaps the answer characters"
    return (f"answer = {len(toks)} tokens, question = {q} tokens, context budget per window = {budget}, "
            f"overlap (stride) = {args.stride}: the answer is longer than the overlap between windows, so no window "
            f"holds it whole" if len(toks) > args.stride + 1 else
            f"answer = {len(toks)} tokens at chars {a_s}-{a_e}; window context char ranges {spans}")


if __name__ == "__main__":
    sys.exit(main())
