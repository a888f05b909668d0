"""Log formats: the same records as JSON lines or text lines, secrets removed from both, library noise cleaned."""
import json
import logging

import pytest

from job.observe.logs import JsonFormatter
from job.observe.records import LibraryRecords, parse_load_report
from job.observe.redaction import register_secrets
from job.observe.textlog import TextFormatter

# what transformers 5 logs when a base model gets a fresh QA head (colour codes included)
LOAD_REPORT = ("\x1b[1mBertForQuestionAnswering LOAD REPORT\x1b[0m from: /models/minilm\n"
               "Key                 | Status     | \n--------------------+------------+-\n"
               "pooler.dense.bias   | \x1b[38;5;208mUNEXPECTED\x1b[0m | \n"
               "qa_outputs.weight   | \x1b[31mMISSING\x1b[0m    | \nqa_outputs.bias     | \x1b[31mMISSING\x1b[0m    | \n\n"
               "Notes:\n- \x1b[38;5;208mUNEXPECTED:\x1b[0m\tcan be ignored when loading from different task/architecture\n"
               "- \x1b[31mMISSING:\x1b[0m\tthose params were newly initialized because missing from the checkpoint.")


def record(msg, name="job.test", level=logging.INFO, **extra):
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    LibraryRecords().filter(rec)
    return rec


@pytest.fixture
def formats():
    return JsonFormatter(), TextFormatter()


def test_both_formats_show_each_record_once_with_its_event(formats):
    as_json, as_text = formats
    for rec in (record("progress", event="progress", step=3, max_steps=12, loss=4.5, learning_rate=2e-5,
                       samples_per_second=10.0, eta_seconds=65.0),
                record("evaluation finished", event="eval", step=4, examples=8, during_training=True, exact_match=12.5, f1=20.25),
                record("something new", event="brand_new", answer=42)):
        line = as_text.format(rec)
        assert "\n" not in line and line.split()[1] == json.loads(as_json.format(rec))["event"]
    assert "step 3/12 (25%)" in as_text.format(record("p", event="progress", step=3, max_steps=12, loss=4.5,
                                                        learning_rate=2e-5, samples_per_second=10.0, eta_seconds=65.0))
    assert "answer=42" in as_text.format(record("something new", event="brand_new", answer=42))


def test_secrets_are_removed_from_text_lines_too(formats):
    register_secrets({"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz"})
    rec = record("storage refused s3cr3t-value-xyz", event="storage_retry", call="https://user:pw@host/x",
                 error="key s3cr3t-value-xyz")
    for formatter in formats:
        line = formatter.format(rec)
        assert "s3cr3t-value-xyz" not in line and "user:pw" not in line and "***" in line


def test_switch_values_of_credential_named_variables_leave_lines_whole(formats):
    """TOKENIZERS_PARALLELISM=false once masked every `false` of every line: lines stopped being JSON."""
    quoted = 'se"cr\\et-Quokka-77'  # a secret JSON escapes: it must go from the value, not from the escaped text
    register_secrets({"TOKENIZERS_PARALLELISM": "false", "SOME_API_TOKEN": "true", "MY_ACCESS_KEY": "1",
                      "HF_TOKEN_ENABLED": "disabled", "ODD_PASSWORD": quoted})
    as_json, as_text = formats
    rec = record("evaluation finished false 1", event="eval", step=1, during_training=False, squad_v2=False,
                 exact_match=1, f1=1.0, note="true", settings={"squad_v2": False, "token": quoted}, call=f"x {quoted} y")
    entry = json.loads(as_json.format(rec))
    assert entry["msg"] == "evaluation finished false 1" and entry["note"] == "true"
    assert entry["during_training"] is False and entry["squad_v2"] is False and entry["exact_match"] == 1
    assert entry["settings"] == {"squad_v2": False, "token": "***"} and entry["call"] == "x *** y"
    text = as_text.format(record("switch is false", event="brand_new", call=f"x {quoted} y", flag=True))
    assert quoted not in text and "switch is false" in text and "flag=True" in text


def test_what_counts_as_a_secret():
    from job.observe.redaction import could_be_secret

    for value in ("false", "TRUE", "1", "0.5", "-3", "off", "disabled", "abc", "  yes  ", "1e-3"):
        assert not could_be_secret(value), value
    for value in ("hunter2!", "pw-1", "s3cr3t-value-xyz", "passwords", "123456789", "/var/run/secrets/token",
                  "AKIAIOSFODNN7EXAMPLE"):
        assert could_be_secret(value), value


def test_summary_block_puts_scores_beside_the_untrained_head(formats):
    _, as_text = formats
    text = as_text.format(record("run summary", event="summary", run_id="demo", exact_match=41.0, f1=52.25, examples=100,
                                 baseline={"exact_match": 0.0, "f1": 6.5, "examples": 100}, steps=21, train_runtime=95.0,
                                 train_samples_per_second=3.4, model="outputs/demo/model", curves="outputs/demo/model/c.png",
                                 tensorboard="tensorboard --logdir outputs/demo/logs", answer_command="python -m job.answer"))
    assert "41.0   untrained head: 0.0" in text and "52.2   untrained head: 6.5" in text  # 52.25 rounds half-even
    assert "1m 35s, 21 steps" in text and "tensorboard --logdir outputs/demo/logs" in text


def test_model_load_report_becomes_one_clean_event(formats):
    rec = record(LOAD_REPORT, name="transformers.modeling_utils", level=logging.WARNING)
    assert rec.event == "model_load_report" and rec.missing == ["qa_outputs.bias", "qa_outputs.weight"]
    assert rec.unexpected == ["pooler.dense.bias"]
    for formatter in formats:
        line = formatter.format(rec)
        assert "\x1b" not in line and "\\u001b" not in line and "qa_outputs.bias, qa_outputs.weight" in line


def test_colour_codes_leave_other_library_warnings():
    rec = record("\x1b[33mslow tokenizer\x1b[0m in use", name="somelib", level=logging.WARNING)
    assert rec.getMessage() == "slow tokenizer in use" and rec.event == "library_warning"
    assert parse_load_report("an ordinary message") is None


def test_a_loss_that_is_not_finite_stays_visible_and_the_line_stays_json(formats):
    """A diverged loss was hidden (the Trainer's NaN filter logged 0.0); shown, it must not break the JSON line."""
    as_json, as_text = formats
    rec = record("progress", event="progress", step=2, max_steps=8, loss=float("nan"), learning_rate=float("inf"),
                 samples_per_second=1.0, eta_seconds=6.0, history=[1.0, float("-inf")])
    line = json.loads(as_json.format(rec), parse_constant=lambda word: pytest.fail(f"not JSON: {word}"))
    assert (line["loss"], line["learning_rate"], line["history"]) == ("nan", "inf", [1.0, "-inf"])
    assert "nan" in as_text.format(rec)


def test_the_exporters_information_lines_stay_out_of_the_job_log(capsys):
    """Publishing with the ONNX exports printed ~60 lines of the exporter's passes and the quantizer's
    per-tensor notes (the latter on the root logger); their warnings still show."""
    from job.observe.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("onnx_ir", "onnxscript")}
    try:
        setup_logging(fmt="json")
        logging.getLogger("onnx_ir.passes.common.unused_removal").info("Removed 12 unused nodes")
        logging.info('Quantization parameters for tensor:"gelu" not specified')
        logging.getLogger("job.export").info("export checked", extra={"event": "export"})
        logging.warning("a library's warning on the root logger")
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    assert [(line["logger"], line.get("event")) for line in lines] == [("job.export", "export"), ("root", "library_warning")]
