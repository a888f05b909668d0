"""The model card (``model/README.md``): what the model is, how well it does, how it trained, how to use it.

The front matter is written by ``huggingface_hub``'s ``ModelCardData`` with ``EvalResult``s, so a
hub that receives the folder shows the scores (``model-index``). The base model is named by its
hub id, never by a path on the machine that trained it.
"""
from __future__ import annotations

import re
from pathlib import Path

from job import safe_json
from job.observe.curves import FILENAME as CURVES
from job.observe.redaction import redact_text
from job.store.locations import is_s3

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")


def base_model(model_name: str) -> tuple[str | None, str]:
    """``(hub id or None, how to name it in prose)`` for QA_MODEL_NAME.

    A hub id stays as it is. A folder in the Hugging Face cache (``models--org--name/snapshots/...``)
    is that hub model. Any other folder is "a local model": its ``config.json`` may name a hub id
    (``_name_or_path``), but that is where it was loaded from before it was saved, which for a
    fine-tuned folder is its own base (the demo's MiniLM records ``nreimers/MiniLM-L6-H384-uncased``,
    not ``sentence-transformers/all-MiniLM-L6-v2``); it is mentioned, never claimed as the base.
    """
    path = Path(model_name).expanduser()
    if not path.is_dir():
        return model_name, f"`{model_name}`"
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 1:
            hub_id = part[len("models--"):].replace("--", "/")
            return hub_id, f"`{hub_id}`"
    kind, origin = "", None
    try:
        config = safe_json.loads((path / "config.json").read_text())
        config = config if isinstance(config, dict) else {}  # the card is prose: a config it cannot read names nothing
        kind = f"{config.get('model_type')} " if isinstance(config.get("model_type"), str) else ""
        named = config.get("_name_or_path")
        if isinstance(named, str) and _HUB_ID.fullmatch(named) and not named.startswith("."):
            origin = named
    except (OSError, ValueError):
        pass
    prose = f"a local {kind}model (not a Hugging Face Hub id)"
    if origin:
        prose += f"; its `config.json` records `{origin}` as where it came from"
    return None, prose


def _dataset(split: dict, settings, name: str) -> tuple[str, str, str | None]:
    """``(dataset type, readable name, split)``: the hub id for hub data, else the file's name (no local path)."""
    source = str(split.get("source", "?"))
    uri = settings.train_uri if name == "train" else settings.eval_uri
    if not uri:
        return settings.dataset, settings.dataset, settings.train_split if name == "train" else settings.eval_split
    shown = source if is_s3(source) else Path(source).name
    return "custom", shown, None


def _distilled(distillation: dict | None) -> str:
    """", distilled from <teacher> (...)" for a run trained against a teacher (``job.distill``), else ""."""
    if not distillation:
        return ""
    _, teacher = base_model(str(distillation.get("teacher")))
    return (f", distilled from {teacher} (teacher `{distillation.get('teacher_identity')}`; loss alpha "
            f"{distillation.get('alpha')} x gold spans + (1 - alpha) x T² x KL to the teacher at temperature "
            f"{distillation.get('temperature')})")


def _shown(value):
    return redact_text(value) if value else value


_RUNTIMES = {"torch": "torch (fp32)", "onnx": "ONNX Runtime, fp32", "onnx-int8": "ONNX Runtime, int8 (dynamic)"}


def _serving(serving: dict | None) -> str:
    """The card's "Serving" section: each published runtime's file with its sha256 and scores, what was not
    published and why, and SQuAD v2's no-answer threshold (``job.export``)."""
    if not serving:
        return ""
    lines = ["## Serving", "",
             "Scored on the eval set above with the same windows and decoding, on the CPU (`serving.json` records it all).",
             "", "| runtime | file | bytes | sha256 | exact match | F1 | check |", "|---|---|---|---|---|---|---|"]
    for runtime, entry in serving.get("runtimes", {}).items():
        em, f1 = entry.get("exact_match"), entry.get("f1")
        check = ""
        if "mismatches" in entry:
            check = (f"answers as torch (largest logit difference {entry['max_abs_logit_diff']:.2g}, "
                     f"{entry['near_ties']} near-ties)")
        elif "f1_drop" in entry:
            check = f"F1 {entry['f1_drop']:+.2f} below torch" if entry["f1_drop"] >= 0 else f"F1 {-entry['f1_drop']:.2f} above torch"
        for f in entry.get("files", []):
            lines.append(f"| {_RUNTIMES.get(runtime, runtime)} | `{f['name']}` | {f['bytes']:,} | `{f['sha256']}` | "
                         f"{'' if em is None else f'{em:.2f}'} | {'' if f1 is None else f'{f1:.2f}'} | {check} |")
    for runtime, why in serving.get("not_published", {}).items():
        lines.append(f"\nNot published: {_RUNTIMES.get(runtime, runtime)}: {why}.")
    threshold = serving.get("null_threshold")
    if threshold:
        lines.append(f"\nNo-answer threshold (SQuAD v2), applied by `job.answer` unless `--null-threshold` is given: "
                     f"**{threshold['value']:.4g}** ({threshold['choice']}). The official search found best F1 "
                     f"{_num(threshold.get('best_f1'))} at {_num(threshold.get('best_f1_thresh'))} and best exact match "
                     f"{_num(threshold.get('best_exact'))} at {_num(threshold.get('best_exact_thresh'))}; the scores above "
                     f"use {threshold['configured']:g} (`QA_NULL_SCORE_DIFF_THRESHOLD`).")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "?" if value is None else f"{value:.4g}"


def write_card(path: Path, settings, metrics: dict, context: dict) -> None:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    # the card is text, not JSON: what it shows of names and paths is redacted here, before the YAML
    # is written (a mask spliced into YAML afterwards could turn a value into an alias)
    hub_id, base_prose = base_model(settings.model_name)
    hub_id = _shown(hub_id)
    data = context.get("data", {})
    eval_type, eval_name, eval_split = map(_shown, _dataset(data.get("eval", {}), settings, "eval"))
    train_type, train_name, _ = map(_shown, _dataset(data.get("train", {}), settings, "train"))
    results = [EvalResult(task_type="question-answering", task_name="Extractive Question Answering",
                          dataset_type=eval_type, dataset_name=eval_name, dataset_split=eval_split,
                          dataset_config=settings.dataset_config if eval_type != "custom" else None,
                          metric_type=key, metric_name=label, metric_value=metrics[key])
               for key, label in (("exact_match", "Exact Match"), ("f1", "F1"))]
    card_data = ModelCardData(
        model_name=settings.run_id, base_model=hub_id, library_name="transformers", pipeline_tag="question-answering",
        tags=["question-answering", "extractive-qa", "squad_v2" if settings.squad_v2 else "squad"],
        datasets=sorted({t for t in (train_type, eval_type) if t != "custom"}) or None, eval_results=results,
    )
    body = redact_text(_body(settings, metrics, context, base_prose, train_name, eval_name))
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(path)


def _body(settings, metrics: dict, context: dict, base_prose: str, train_name: str, eval_name: str) -> str:
    data = context.get("data", {})
    during = metrics.get("eval_during_training") or {}
    baseline = next((p for p in during.get("points", []) if p["step"] == 0), None)
    rows = [f"| fine-tuned | {metrics['exact_match']:.2f} | {metrics['f1']:.2f} | all {metrics.get('total', '?')} |"]
    if baseline:
        n = during.get("examples")
        which = f"first {n}" if n and n < metrics.get("total", n) else f"all {n}"
        rows.insert(0, f"| untrained QA head (step 0) | {baseline['exact_match']:.2f} | {baseline['f1']:.2f} | {which} |")
    every = "".join(f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n"
                    for k, v in metrics.items() if v is not None and not isinstance(v, (dict, list)))
    runtime = metrics.get("train_runtime")
    return f"""
# {settings.run_id}

Extractive question answering model (answers are spans of the given context), fine-tuned by
qa-finetune from {base_prose}{_distilled(context.get("distillation"))}.

## Evaluation

Official SQuAD {'v2.0' if settings.squad_v2 else 'v1.1'} rules on `{eval_name}` ({data.get('eval', {}).get('examples', '?')} questions).

| model | exact match | F1 | questions |
|---|---|---|---|
{chr(10).join(rows)}

{_serving(metrics.get("serving"))}
## Training curves

![Training loss, learning rate and evaluation scores against step]({CURVES})

## Training

- data: `{train_name}` ({data.get('train', {}).get('examples', '?')} questions)
- {metrics.get('global_step', '?')} steps; epochs {settings.epochs:g}, learning rate {settings.learning_rate:g}, batch {settings.batch_size} x {settings.grad_accum_steps} accumulation x {context.get('world_size', 1)} processes
- windows of {settings.max_length} tokens, stride {settings.doc_stride}; precision {context.get('precision', '?')} on {context.get('device', '?')}
- train time {f'{runtime:.1f} s' if isinstance(runtime, (int, float)) else '?'} (this attempt)

## Use

```sh
python -m job.answer --model <this folder or s3://.../model> --question "Who won?" --context "The Broncos won."
python -m job.answer --runtime onnx-int8 --model <this folder or s3://.../model> --question "Who won?" --context "The Broncos won."
```

transformers 5 has no `question-answering` pipeline; `job.answer` decodes exactly as the evaluation did.

## All metrics

| metric | value |
|---|---|
{every}"""
