"""Log records as short lines for a person at a terminal (``QA_LOG_FORMAT=text``, or ``auto`` on a terminal).

``HH:MM:SS  event        what happened``: the same records as the JSON lines, one line each
(the closing summary is a small block). Known events get a sentence; any other record shows its
message and fields. Everything passes through ``job.observe.redaction`` like the JSON lines.
"""
from __future__ import annotations

import logging
import time

from job.observe.records import record_fields
from job.observe.redaction import redact, redact_text

_WIDTH = 11  # the event column


def _num(value, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _progress(f: dict) -> str:
    done = f"step {f.get('step')}/{f.get('max_steps')}"
    if isinstance(f.get("step"), int) and f.get("max_steps"):
        done += f" ({100 * f['step'] // f['max_steps']}%)"
    lr = f.get("learning_rate")
    parts = [done, f"loss {_num(f.get('loss'), 3)}", f"lr {lr:.2e}" if isinstance(lr, float) else "lr ?",
             f"{_num(f.get('samples_per_second'))} samples/s"]
    if f.get("eta_seconds") is not None:
        parts.append(f"{duration(f['eta_seconds'])} left")
    return " · ".join(parts)


def _eval(f: dict) -> str:
    what = f"step {f.get('step')}" if f.get("during_training") else "final"
    return f"{what}: EM {_num(f.get('exact_match'))} · F1 {_num(f.get('f1'))} on {f.get('examples', f.get('total'))} questions"


def _summary(f: dict) -> str:
    base = f.get("baseline") or {}

    def score(key: str, label: str) -> str:
        line = f"  {label:<13}{_num(f.get(key)):>6}"
        if base:
            line += f"   untrained head: {_num(base.get(key))}"
            if base.get("examples") != f.get("examples"):
                line += f" (first {base.get('examples')} questions)"
        return line

    lines = [f"run {f.get('run_id')} finished: {f.get('examples')} eval questions, official SQuAD rules",
             score("exact_match", "exact match"), score("f1", "F1"),
             f"  {'training':<13}{duration(f.get('train_runtime'))}, {f.get('steps')} steps, "
             f"{_num(f.get('train_samples_per_second'))} samples/s",
             f"  {'model':<13}{f.get('model')}", f"  {'curves':<13}{f.get('curves')}"]
    if f.get("tensorboard"):
        lines.append(f"  {'TensorBoard':<13}{f['tensorboard']}")
    lines.append(f"  {'try it':<13}{f.get('answer_command')}")
    for runtime, scores in (f.get("serving") or {}).items():
        if runtime != "torch" and scores:
            lines.append(f"  {runtime:<13}EM {_num(scores.get('exact_match'))} · F1 {_num(scores.get('f1'))} "
                         f"(torch on the same windows: F1 {_num((f['serving'].get('torch') or {}).get('f1'))})")
    for runtime, why in (f.get("not_published") or {}).items():
        lines.append(f"  {runtime:<13}not published: {why}")
    t = f.get("null_threshold")
    if t:
        lines.append(f"  {'no-answer':<13}threshold {_num(t.get('value'), 3)} ({t.get('choice')}); best F1 "
                     f"{_num(t.get('best_f1'))} at {_num(t.get('best_f1_thresh'), 3)}, best EM {_num(t.get('best_exact'))} "
                     f"at {_num(t.get('best_exact_thresh'), 3)}")
    return "\n".join(lines)


def _sample(f: dict) -> str:
    indent = " " * (_WIDTH + 13)
    verdict = "right" if f.get("correct") else "wrong"
    return (f"{f.get('question')}\n{indent}gold:  {' | '.join(map(str, f.get('gold') or []))}\n"
            f"{indent}model: {f.get('answer') or '(no answer)'}   ({verdict})")


_RENDER = {
    "start": lambda f: f"run {f.get('run_id')} starting; results go to "
                       f"{str((f.get('settings') or {}).get('output_uri')).rstrip('/')}/{f.get('run_id')}",
    "lease": lambda f: f"run lease taken (expires after {_num(f.get('ttl_seconds'), 0)} s unless renewed)",
    "model_load_report": lambda f: "",  # the message says it all; the weight lists are in the JSON fields
    "data": lambda f: f"{f.get('split')} data: {f.get('examples')} questions from {f.get('source')}",
    "features": lambda f: f"{f.get('train_windows')} training / {f.get('eval_windows')} eval windows (cache: {f.get('cache')})",
    "setup": lambda f: f"training on {f.get('device')} in {f.get('precision')}, {f.get('world_size')} process(es)"
                       + (f", resuming from step {f['resume_step']}" if f.get("resume_step") is not None else ""),
    "train_start": lambda f: f"training from step {f.get('step')} to {f.get('max_steps')}",
    "progress": _progress,
    "checkpoint_committed": lambda f: f"checkpoint at step {f.get('step')} stored ({f.get('files')} files, "
                                      f"{_num(f.get('upload_seconds'))} s)",
    "resume": lambda f: f"resuming from the checkpoint at step {f.get('step')}",
    "eval": _eval,
    "train_end": lambda f: f"training done at step {f.get('step')} in {duration(f.get('train_runtime'))} "
                           f"({_num(f.get('train_samples_per_second'))} samples/s)",
    "export": lambda f: (f"exports checked in {_num(f.get('seconds'))} s; published: {', '.join(f.get('published') or [])}"
                         + "".join(f"; not {k}: {v}" for k, v in (f.get("not_published") or {}).items())),
    "published": lambda f: f"results published to {f.get('uri')} ({f.get('files')} files)",
    "summary": _summary,
    "sample_answer": _sample,
    "demo_next": lambda f: f"look at the curves in {f.get('curves')}, the model card in {f.get('model_card')}, "
                           f"or run: {f.get('tensorboard')}",
    "done": lambda f: "done",
    "already_complete": lambda f: (f"run {f.get('run_id')} is already complete; nothing to do" if f.get("run_id")
                                   else f"{f.get('output')} is already complete; nothing to do"),
    # python -m job.predict
    "predict_start": lambda f: f"shard {f.get('shard')} of {f.get('shards')} starting; predictions go to "
                               f"{(f.get('settings') or {}).get('predict_output_uri')}",
    "bound": lambda f: f"{f.get('rows')} questions from {f.get('input')}, model {f.get('model')}",
    "plan": lambda f: f"shard {f.get('shard')}: {f.get('rows')} rows in {f.get('chunks')} chunks, {f.get('committed')} "
                      f"committed" + (f", predicting from chunk {f['resume_from']}" if f.get("resume_from") is not None else ""),
    "scorer": lambda f: f"model loaded: {f.get('runtime')} runtime on {f.get('device')}",
    "chunk_committed": lambda f: f"chunk {f.get('chunk')} of {f.get('of')} committed ({f.get('rows')} rows, "
                                 f"{f.get('windows')} windows, {_num(f.get('windows_per_second'))} windows/s)",
    "shard_done": lambda f: f"shard {f.get('shard')} done; {f.get('shards_complete')} of {f.get('shards')} shards complete",
    "merged": lambda f: f"{f.get('rows')} predictions merged into {f.get('uri')}",
    "scores": lambda f: f"EM {_num(f.get('exact_match'))} · F1 {_num(f.get('f1'))} on {f.get('total')} questions with answers",
}


class TextFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        fields = redact(record_fields(record))
        event = fields.pop("event", None)
        render = _RENDER.get(event)
        try:
            body = (render(fields) or record.getMessage()) if render else _generic(record.getMessage(), fields)
        except (TypeError, ValueError, KeyError):  # a field of an unexpected type: say it plainly
            body = _generic(record.getMessage(), fields)
        if record.levelno >= logging.WARNING:
            body = f"{record.levelname.lower()}: {body}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        rank = f"[rank {self.rank}] " if self.rank is not None else ""
        line = f"{stamp}  {rank}{(event or record.name.split('.')[0]):<{_WIDTH}} {body}"
        if fields.get("traceback"):  # an unexpected error: the person at the terminal needs it
            line += "\n" + str(fields["traceback"]).rstrip()
        elif record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return redact_text(line)


def _generic(message: str, fields: dict) -> str:
    fields = {k: v for k, v in fields.items() if k not in ("settings", "traceback")}  # JSON keeps them
    extra = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
    return f"{message} {extra}".strip()


def _short(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."
