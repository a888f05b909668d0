"""Export at publish time: the trained model as ONNX graphs for a server, each checked before it is published.

``model.onnx`` is torch's own exporter (``torch.onnx.export``, the ``torch.export``-based one, with
onnxscript; dynamic batch and sequence axes); ``model_int8.onnx`` is ONNX Runtime's dynamic
quantization of it (int8 weights, activations quantized per batch). The legacy TorchScript exporter
is not used: on MiniLM it gave logits off by up to 0.27 on padded batches (the dynamo one: 6e-7).

The check scores every export on the run's own eval windows with evaluation's decoding, against the
torch model in fp32 on the CPU (the same windows, batches and padding):

- fp32 must give the torch model's answers: every logit of a real token within ``FP32_TOLERANCE``,
  and the same answer (character span) for every question, except a near-tie: a question where the
  torch model's own scores of the two answers differ by at most twice the tolerance (a span's score
  adds two logits; four for v2's null difference against the threshold), where a rounding may
  legitimately pick the other. Near-ties are counted and published. A failed check publishes no
  export (int8 is made from the fp32 graph).
- int8's EM/F1 are measured; over ``QA_INT8_MAX_F1_DROP`` points below the torch model's F1 it is
  not published, and the record says why.

Nothing here stops a run: an export that fails (a model the exporter cannot trace, a missing
package, a full disk) is one ``export_failed`` log line and a record in ``metrics.json``; the model
is published without it. Only a stop request goes through (exit 143, as anywhere else).
``serving.json`` (``job.serving``) records what was published, with sha256, and how it scored.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from job.errors import Preempted, StoppedUncommitted
from job.evaluate import decode_example_answers, final_predictions, scorer_logits, window_lengths
from job.rows import SCORED, each
from job.serving import (DECODING, ONNX, ONNX_FILES, ONNX_INT8, OUTPUT_NAMES, SCHEMA, SERVING, TORCH, file_record,
                         model_inputs, open_scorer)
from job.squad.metrics import squad_scores

log = logging.getLogger(__name__)
FP32_TOLERANCE = 1e-3  # logits are O(10); ONNX Runtime's fused kernels differ from torch's by ~1e-6
CHECK_BATCH = 16  # windows per batch in the check: ONNX Runtime's CPU kernels gain little past it


def export_and_check(settings, model_dir: Path, eval_features, eval_rows, scores: dict, stop=None) -> dict:
    """Export what ``QA_EXPORT`` asks into ``model_dir``, check it, keep what passed, write ``serving.json``.

    Returns the ``serving`` record of ``metrics.json``: per runtime its file, sha256 and EM/F1, the
    torch model's own, near-ties, what was not published and why, and (v2) the chosen threshold.
    """
    record: dict = {"requested": list(settings.export_runtimes), "runtimes": {}, "not_published": {}}
    threshold = chosen_threshold(settings, scores)
    if threshold:
        record["null_threshold"] = threshold
    if settings.export_runtimes:
        started = time.monotonic()
        try:
            _export_checked(settings, model_dir, eval_features, eval_rows, record, stop)
        except (Preempted, StoppedUncommitted):
            _remove_exports(model_dir)
            raise
        except Exception as exc:  # noqa: BLE001  any failure of the exporter or the runtime: publish without it
            _remove_exports(model_dir)
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            record["failed"] = reason
            record["runtimes"] = {k: v for k, v in record["runtimes"].items() if k == TORCH}
            for runtime in settings.export_runtimes:
                record["not_published"][runtime] = f"export failed ({reason})"
            log.warning("export failed; the model is published without it", extra={
                "event": "export_failed", "reason": reason})
        record["seconds"] = round(time.monotonic() - started, 1)
    write_serving(settings, model_dir, record)
    if settings.export_runtimes:
        log.info("export checked", extra={"event": "export", **_loggable(record)})
    return record


def _export_checked(settings, model_dir: Path, features, rows, record: dict, stop) -> None:
    import tempfile

    wanted = settings.export_runtimes
    reference = open_scorer(model_dir, TORCH)
    torch_logits = scorer_logits(reference, features, CHECK_BATCH, stop)
    torch_answers = decode_example_answers(rows, features, *torch_logits, settings)
    torch_scores = _scores(settings, rows, torch_answers)
    record["runtimes"][TORCH] = {**torch_scores}
    fp32_path = model_dir / ONNX_FILES[ONNX]
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as scratch:
        # an int8-only export still needs the fp32 graph to quantize: it stays in the scratch folder
        fp32_path = fp32_path if ONNX in wanted else Path(scratch) / ONNX_FILES[ONNX]
        export_onnx(reference, fp32_path, features)
        fp32 = _OnnxFile(model_dir, fp32_path, ONNX)
        fp32_logits = scorer_logits(fp32.scorer, features, CHECK_BATCH, stop)
        agreement = compare(torch_logits, torch_answers, fp32_logits,
                            decode_example_answers(rows, features, *fp32_logits, settings), window_lengths(features),
                            settings)
        fp32_entry = {**_scores(settings, rows, decode_example_answers(rows, features, *fp32_logits, settings)),
                      **agreement}
        if agreement["mismatches"] or agreement["max_abs_logit_diff"] > FP32_TOLERANCE:
            why = (f"fp32 graph does not answer as the torch model: {agreement['mismatches']} answers differ beyond "
                   f"near-ties, largest logit difference {agreement['max_abs_logit_diff']:.3g} (tolerance {FP32_TOLERANCE})")
            for runtime in wanted:
                record["not_published"][runtime] = why
            record["check"] = {ONNX: fp32_entry}
            _remove_exports(model_dir)
            return
        if ONNX in wanted:
            record["runtimes"][ONNX] = {**fp32_entry, "files": [file_record(fp32_path)]}
        if ONNX_INT8 in wanted:
            int8_path = model_dir / ONNX_FILES[ONNX_INT8]
            quantize_int8(fp32_path, int8_path)
            int8 = _OnnxFile(model_dir, int8_path, ONNX_INT8)
            int8_logits = scorer_logits(int8.scorer, features, CHECK_BATCH, stop)
            int8_scores = _scores(settings, rows, decode_example_answers(rows, features, *int8_logits, settings))
            drop = torch_scores["f1"] - int8_scores["f1"]
            int8_entry = {**int8_scores, "f1_drop": drop}
            if drop > settings.int8_max_f1_drop:
                int8_path.unlink()
                record["not_published"][ONNX_INT8] = (f"F1 {int8_scores['f1']:.2f} is {drop:.2f} points below the torch "
                                                      f"model's {torch_scores['f1']:.2f}, over QA_INT8_MAX_F1_DROP="
                                                      f"{settings.int8_max_f1_drop:g}")
                record["check"] = {ONNX_INT8: int8_entry}
            else:
                record["runtimes"][ONNX_INT8] = {**int8_entry, "files": [file_record(int8_path)]}


class _OnnxFile:
    """A graph just written, opened the way a server opens it (``job.serving.OnnxScorer``)."""

    def __init__(self, model_dir: Path, path: Path, runtime: str):
        from job.serving import OnnxScorer

        self.scorer = OnnxScorer(model_dir, runtime, path)


def export_onnx(reference, dest: Path, features) -> None:
    """``torch.onnx.export`` of the torch scorer's model (fp32, CPU) to ``dest``: one file (no external data),
    inputs the model's own (``job.serving.model_inputs``), batch and sequence axes dynamic."""
    import torch

    model = reference.model
    names = model_inputs(model, reference.tokenizer)
    # two windows of different lengths: an example shape no axis can be specialised to
    sample = features.select(range(min(2, len(features))))
    batch = reference.tokenizer.pad({k: sample[k] for k in names}, return_tensors="pt")
    if len(batch[names[0]]) < 2:
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    batch_dim, length_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    tmp = dest.with_name(f".{dest.name}.tmp")
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(model, (), kwargs={k: batch[k] for k in names},
                                    dynamic_shapes={k: {0: batch_dim, 1: length_dim} for k in names},
                                    input_names=names, output_names=list(OUTPUT_NAMES), dynamo=True,
                                    external_data=False, verbose=False)
        program.save(str(tmp), external_data=False)
    os.replace(tmp, dest)


@contextlib.contextmanager
def _quiet():
    """The exporter's progress and warnings (torchvision absent, axis renames) on stderr say nothing a user
    can act on; what matters is in the ``export`` or ``export_failed`` event."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def quantize_int8(src: Path, dest: Path) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights of every MatMul, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_name(f".{dest.name}.tmp")
    root = logging.getLogger()
    advice = _DropAdvice()
    root.addFilter(advice)  # its advice to pre-process first: symbolic shape inference fails on these graphs
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(advice)
    os.replace(tmp, dest)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def compare(ref_logits, ref_answers: dict, logits, answers: dict, lengths, settings) -> dict:
    """How an export's answers agree with the torch model's: the largest logit difference on real tokens,
    the questions answered differently, and those among them that are near-ties (module docstring)."""
    diff = 0.0
    for ref, other in zip(ref_logits, logits):
        for i, n in enumerate(lengths):
            diff = max(diff, float(np.max(np.abs(ref[i, :n] - other[i, :n]), initial=0.0)))
    threshold = settings.null_score_diff_threshold
    differ = near = 0
    for rid, ref in ref_answers.items():
        other = answers[rid]
        ref_text = final_predictions({rid: ref}, settings.squad_v2, threshold)[rid]
        other_text = final_predictions({rid: other}, settings.squad_v2, threshold)[rid]
        if (ref.start, ref.end) == (other.start, other.end) and ref_text == other_text:
            continue
        differ += 1
        if settings.squad_v2 and bool(ref_text) != bool(other_text):  # the torch model's null difference at the threshold
            near += abs(ref.null_score - ref.score - threshold) <= 4 * FP32_TOLERANCE
        else:  # two spans, each scored under its own runtime's logits
            near += abs(ref.score - other.score) <= 2 * FP32_TOLERANCE
    return {"max_abs_logit_diff": diff, "answers_differ": differ, "near_ties": near, "mismatches": differ - near}


def chosen_threshold(settings, scores: dict) -> dict:
    """SQuAD v2: the no-answer threshold a server applies (``QA_NULL_THRESHOLD_CHOICE``), with both found; {} for v1."""
    if not settings.squad_v2:
        return {}
    found = {"best_f1_thresh": scores.get("best_f1_thresh"), "best_exact_thresh": scores.get("best_exact_thresh"),
             "configured": settings.null_score_diff_threshold}
    choice = settings.null_threshold_choice
    value = settings.null_score_diff_threshold if choice == "configured" else found[f"{choice}_thresh"]
    if value is None:  # not finite: nothing a server can apply
        choice, value = "configured", settings.null_score_diff_threshold
    return {"choice": choice, "value": value, **found,
            "best_f1": scores.get("best_f1"), "best_exact": scores.get("best_exact")}


def write_serving(settings, model_dir: Path, record: dict) -> None:
    """``serving.json`` beside the model: the published runtimes and files, the options the model was evaluated
    with (v2's threshold: the chosen one), and what was not published and why."""
    decoding = {k: getattr(settings, k) for k in DECODING if k not in ("version_2", "null_score_diff_threshold")}
    decoding["version_2"] = settings.squad_v2
    decoding["null_score_diff_threshold"] = float(record.get("null_threshold", {}).get(
        "value", settings.null_score_diff_threshold))
    runtimes = {TORCH: {"files": [file_record(p) for p in sorted(model_dir.glob("*.safetensors"))],
                        **{k: v for k, v in record["runtimes"].get(TORCH, {}).items() if k != "files"}}}
    runtimes.update({k: v for k, v in record["runtimes"].items() if k != TORCH})
    serving = {"schema": SCHEMA, "runtimes": runtimes, "decoding": decoding,
               "not_published": record["not_published"]}
    if "null_threshold" in record:
        serving["null_threshold"] = record["null_threshold"]
    tmp = model_dir / f".{SERVING}.tmp"
    tmp.write_text(json.dumps(serving, indent=1))
    os.replace(tmp, model_dir / SERVING)
    record["runtimes"] = runtimes


def _scores(settings, rows, answers: dict) -> dict:
    predictions = final_predictions(answers, settings.squad_v2, settings.null_score_diff_threshold)
    scores = squad_scores(each(rows, SCORED), predictions, version_2=settings.squad_v2)
    return {"exact_match": scores["exact_match"], "f1": scores["f1"]}


def _remove_exports(model_dir: Path) -> None:
    for name in ONNX_FILES.values():
        for path in (model_dir / name, model_dir / f".{name}.tmp"):
            path.unlink(missing_ok=True)


def _loggable(record: dict) -> dict:
    out = {"published": sorted(record["runtimes"]), "not_published": record["not_published"]}
    for runtime, entry in record["runtimes"].items():
        out[runtime] = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in entry.items() if k != "files"}
    for key in ("failed", "seconds", "null_threshold"):
        if key in record:
            out[key] = record[key]
    return out
