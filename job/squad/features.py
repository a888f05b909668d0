"""Turn SQuAD rows into span-aligned, stride-windowed features: pure functions of the tokenizer and the rows.

Long contexts become several windows of at most ``QA_MAX_LENGTH`` tokens that overlap by
``QA_DOC_STRIDE`` tokens. A training window is labelled with the answer's token start/end only when
the *whole* answer lies inside its context part; otherwise both labels point at CLS (the
"no answer here" position). Windows are not padded here: the collator pads each batch to its own
longest window, which is most of the speed win on SQuAD (~160 real tokens per window, not 384).
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)
CHUNK = 1000  # rows per tokenizer call, and per task of the preprocessing workers
QUESTION_ADVANCE = 8  # the fewest new context tokens a window brings, however long the question


def label_window(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None], answer_start: int | None,
                 answer_end: int | None, cls_index: int = 0) -> tuple[int, int]:
    """Token (start, end) of the character span [answer_start, answer_end) in one window.

    ``offsets`` are the tokenizer's character offsets, ``sequence_ids`` mark question (0),
    context (1) and special tokens (None). Returns ``(cls_index, cls_index)`` when there is no
    answer or it is not entirely inside the window's context part: a half answer is a wrong label.
    """
    if answer_start is None or answer_end is None:
        return cls_index, cls_index
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if offsets[first][0] > answer_start or offsets[last][1] < answer_end:
        return cls_index, cls_index
    # the first token that ends after the answer starts, the last that starts before it ends:
    # whitespace around a gold span (tokens never cover it) does not widen the label
    start = first
    while start <= last and offsets[start][1] <= answer_start:
        start += 1
    end = last
    while end >= first and offsets[end][0] >= answer_end:
        end -= 1
    if start > end:  # nothing but whitespace
        return cls_index, cls_index
    return start, end


def question_budget(tokenizer, max_length: int, stride: int) -> int:
    """The most tokens a question may take so that every window still brings new context.

    With overflowing windows the context part of a window must be longer than the stride, or the
    fast tokenizer panics (a Rust panic, which is not even an ``Exception``). Past this budget a
    question is cut at a token boundary; QUESTION_ADVANCE context tokens per window remain.
    """
    return max_length - tokenizer.num_special_tokens_to_add(pair=True) - stride - QUESTION_ADVANCE


def fit_questions(tokenizer, questions: list[str], budget: int) -> tuple[list[str], list[int]]:
    """Questions cut to at most ``budget`` tokens, and the indices of those that were cut."""
    # A token covers at least one byte in every tokenizer family, so shorter questions cannot be over.
    suspects = [i for i, q in enumerate(questions) if len(q.encode("utf-8", "replace")) + 2 > budget]
    if not suspects:
        return questions, []
    enc = tokenizer([questions[i] for i in suspects], add_special_tokens=False, return_offsets_mapping=True)
    out, cut = list(questions), []
    for i, offsets in zip(suspects, enc["offset_mapping"]):
        if len(offsets) <= budget:
            continue
        for keep in range(budget, 0, -1):  # re-tokenizing a cut string can split it differently: check it fits
            out[i] = questions[i][:offsets[keep - 1][1]]
            if len(tokenizer(out[i], add_special_tokens=False)["input_ids"]) <= budget:
                break
        cut.append(i)
    return out, cut


def tokenize(tokenizer, rows: Sequence[dict], max_length: int, stride: int):
    # Questions are left-stripped: some have thousands of leading spaces, which would eat the
    # whole window and make "only_second" truncation fail.
    questions, cut = fit_questions(tokenizer, [r["question"].lstrip() for r in rows], question_budget(tokenizer, max_length, stride))
    if cut:
        log.warning("long questions cut to fit the window", extra={
            "event": "questions_truncated", "count": len(cut), "max_question_tokens": question_budget(tokenizer, max_length, stride),
            "ids": [str(rows[i].get("id", ""))[:60] for i in cut[:5]]})
    return tokenizer(
        questions, [r["context"] for r in rows],
        truncation="only_second", max_length=max_length, stride=stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
    )


def train_features(tokenizer, rows: Sequence[dict], max_length: int, stride: int) -> dict[str, list]:
    columns = {name: [] for name in (*tokenizer.model_input_names, "start_positions", "end_positions")}
    for begin in range(0, len(rows), CHUNK):
        chunk = rows[begin:begin + CHUNK]
        enc = tokenize(tokenizer, chunk, max_length, stride)
        for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
            answers = chunk[example_index]["answers"]
            start_char = end_char = None
            if answers["text"]:
                start_char = answers["answer_start"][0]
                end_char = start_char + len(answers["text"][0])
            ids = enc["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            s, e = label_window(enc["offset_mapping"][i], enc.sequence_ids(i), start_char, end_char, cls)
            for name in tokenizer.model_input_names:
                columns[name].append(enc[name][i])
            columns["start_positions"].append(s)
            columns["end_positions"].append(e)
    return columns


def eval_features(tokenizer, rows: Sequence[dict], max_length: int, stride: int) -> dict[str, list]:
    """Windows plus what decoding needs: the example index and context-only offsets ([-1, -1] elsewhere)."""
    columns = {name: [] for name in (*tokenizer.model_input_names, "example_index", "offset_mapping")}
    for begin in range(0, len(rows), CHUNK):
        enc = tokenize(tokenizer, rows[begin:begin + CHUNK], max_length, stride)
        for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(i)
            for name in tokenizer.model_input_names:
                columns[name].append(enc[name][i])
            columns["example_index"].append(begin + example_index)
            columns["offset_mapping"].append(
                [list(o) if s == 1 else [-1, -1] for o, s in zip(enc["offset_mapping"][i], seq)]
            )
    return columns
