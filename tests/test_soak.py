"""The soak (bench/soak.py): each invariant catches what it is about, and a short soak runs on every CI run.

The invariants (tests/support/invariants.py over snapshots of an output, tests/support/outcomes.py over what
each step's processes did) are pure functions: each
is shown to hold on a sound snapshot built by hand and to report the snapshot broken the way it
is about (an invariant that cannot fail proves nothing). ``test_short_soak`` then runs a short
random history of the real job against SeaweedFS under faults, with a seed drawn per run (fixed
with ``QA_SOAK_SEED``), and fails on any violation, printing the seed and the command that replays it.
"""
import copy
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from tests.support import invariants as inv
from tests.support import outcomes
from tests.support.outcomes import Proc
from tests.support.snapshot import Policy, Snapshot, make_obj
from tests.support.jobrun import ROOT

POLICY = Policy(keep_runs=2, gates={"c": ("f1", 10.0, 5.0)})
SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3tValue99"}


def entry(seq, run, previous=None, action="promote", by="nightly", held=None, rollback_to="same", **extra):
    gate = {"metric": "f1", "candidate": 50.0, "holder": 48.0 if previous else None, "mean_difference": 2.0 if previous else None,
            "interval": [-1.0, 5.0] if previous else None}
    return {"schema": 1, "channel": "c", "seq": seq, "run_id": run, "model_uri": f"s3://b/out/{run}/model",
            "metrics": {"f1": 50.0}, "fingerprint": f"fp-{run}", "recipe": "r", "data_fingerprint": "d",
            "eval_fingerprint": "e", "warm_starts": 0, "previous": previous,
            "rollback_to": previous if rollback_to == "same" else rollback_to, "promoted_at": "t", "promoted_by": by,
            "changed_at": "t", "action": action, "reason": "", "held": held,
            **({"gate": gate} if by == "nightly" and action == "promote" else {}), **extra}


def complete_run(run):
    weights = f"weights of {run}".encode()
    listed = {"torch": [{"name": "model/model.safetensors", "sha256": make_obj(weights).sha256}]}
    return {f"{run}/COMPLETE": {}, f"{run}/metrics.json": {"f1": 50.0}, f"{run}/predictions.json": {},
            f"{run}/manifest.json": {"serving_files": listed}, f"{run}/run.json": {"run_id": run, "fingerprint": f"fp-{run}"},
            f"{run}/model/config.json": {"dim": 32}, f"{run}/model/model.safetensors": weights}


def checkpoint(run, step):
    files = {"trainer_state.json": b'{"global_step": %d}' % step, "model.safetensors": b"w%d" % step}
    marker = {"step": step, "files": {n: {"size": len(b), "sha256": make_obj(b).sha256} for n, b in files.items()}}
    return {**{f"{run}/checkpoints/checkpoint-{step}/{n}": b for n, b in files.items()},
            f"{run}/checkpoints/checkpoint-{step}/COMMIT.json": marker}


def snapshot(files: dict, step: int = 1) -> Snapshot:
    def raw(value):
        return value if isinstance(value, bytes) else value.encode() if isinstance(value, str) else json.dumps(value, indent=1).encode()
    return Snapshot(step, {k: make_obj(raw(v), SECRETS) for k, v in files.items()})


def sound() -> dict:
    """A channel c whose history promoted r1 then r2 (held by r2); r3 in flight with two committed checkpoints."""
    e1, e2 = entry(1, "r1"), entry(2, "r2", previous="r1")
    return {**complete_run("r1"), **complete_run("r2"), "r3/run.json": {"run_id": "r3", "fingerprint": "fp-r3"},
            **checkpoint("r3", 2), **checkpoint("r3", 4), "r3/lease.json": {"holder": "abc", "ttl_seconds": 10},
            "channels/c.json": e2, "channels/c/history/1.json": e1, "channels/c/history/2.json": e2}


def problems(files: dict, prev: dict | None = None) -> dict[str, list[str]]:
    found = inv.check_storage(snapshot(prev, 0) if prev is not None else None, snapshot(files), POLICY)
    out: dict[str, list[str]] = {}
    for name, problem in found:
        out.setdefault(name, []).append(problem)
    return out


def test_a_sound_output_breaks_no_invariant():
    assert problems(sound(), prev=sound()) == {}


def test_a_pointer_must_name_a_complete_run_with_a_whole_model():
    files = sound()
    del files["r2/COMPLETE"]
    assert "no COMPLETE" in problems(files)["pointers_name_complete_runs"][0]
    files = sound()
    del files["r2/model/model.safetensors"]
    assert "lacks ['model.safetensors']" in problems(files)["pointers_name_complete_runs"][0]
    files = sound()
    files["channels/c.json"] = b'{"seq": '
    assert "not a JSON object" in problems(files)["pointers_name_complete_runs"][0]


def test_a_served_model_must_match_the_sha256_its_manifest_records():
    files = sound()
    files["r2/model/model.safetensors"] = b"weights of r2, torn"
    assert "does not match the sha256" in problems(files)["pointers_name_complete_runs"][0]
    files = sound()
    files["r2/manifest.json"] = {"serving_files": {**files["r2/manifest.json"]["serving_files"],
                                                   "onnx": [{"name": "model/model.onnx", "sha256": "0" * 64}]}}
    assert "'model/model.onnx' that is not there" in problems(files)["pointers_name_complete_runs"][0]
    files = sound()
    files["r2/manifest.json"] = {}
    assert "lists no model files" in problems(files)["pointers_name_complete_runs"][0]


@pytest.mark.parametrize("breakage, expected", [
    (lambda f: f.pop("channels/c/history/1.json"), "history seqs [2] are not 1..1"),
    (lambda f: f.update({"channels/c/history/2.json": entry(2, "r2", previous="r0")}), "names previous 'r0'"),
    (lambda f: f.update({"channels/c/history/2.json": entry(3, "r2", previous="r1")}), "history/2.json holds seq 3"),
    (lambda f: f.update({"channels/c.json": entry(4, "r2", previous="r1")}), "pointer seq 4 but the history ends at 2"),
    (lambda f: f.update({"channels/c.json": entry(2, "r1", previous="r1")}), "differs from history entry 2"),
    (lambda f: f.update({"channels/c.json": entry(3, "r1", previous="r1", action="hold", held={"at": "t"})}),
     "changed the holder from r2 to r1"),
    (lambda f: f.update({"channels/c.json": entry(3, "r1", previous="r2", rollback_to="r0")}), "names rollback_to 'r0'"),
])
def test_history_is_sequential_and_chained(breakage, expected):
    files = sound()
    breakage(files)
    assert any(expected in p for p in problems(files)["history_sequential"]), problems(files)


def test_a_pointer_one_ahead_of_its_history_is_a_killed_mover_not_a_violation():
    files = sound()
    files["channels/c.json"] = entry(3, "r1", previous="r2", action="rollback", by="manual", rollback_to=None)
    assert problems(files) == {}


def test_files_in_a_history_folder_that_are_not_versions_are_not_read_as_versions():
    files = sound()
    files.update({"channels/c/history/\u00b2.json": b"x", "channels/c/history/007.json": entry(7, "r1"),
                  "channels/c/history/notes.txt": b"hand-written"})
    assert problems(files) == {}


def test_history_entries_are_never_rewritten_or_deleted():
    before = sound()
    after = copy.deepcopy(before)
    after["channels/c/history/1.json"] = entry(1, "r1", reason="edited")
    assert "was rewritten" in problems(after, prev=before)["history_never_rewritten"][0]
    del after["channels/c/history/1.json"]
    assert "was deleted" in problems(after, prev=before)["history_never_rewritten"][0]


@pytest.mark.parametrize("gate, expected", [
    ({"candidate": 50.0, "holder": 60.0, "interval": [-9.0, -1.0]}, "whose low end is below -5.0"),
    ({"candidate": 5.0, "holder": 4.0, "interval": [0.0, 2.0]}, "below the floor 10.0"),
    ({"candidate": 40.0, "holder": 38.0, "interval": [0.0, 2.0]}, "but its metrics say 50.0"),
    ({"candidate": 50.0, "holder": None, "interval": None}, "without comparing them"),
])
def test_a_nightly_promotion_must_have_passed_the_gate(gate, expected):
    files = sound()
    bad = entry(2, "r2", previous="r1")
    bad["gate"].update(gate)
    files["channels/c.json"] = files["channels/c/history/2.json"] = bad
    assert any(expected in p for p in problems(files)["promotions_passed_gate"]), problems(files)


def test_a_model_a_channel_needs_is_never_deleted():
    before = {**sound(), **complete_run("r0")}
    before["channels/c/history/1.json"] = entry(1, "r0")
    before["channels/c/history/2.json"] = entry(2, "r1", previous="r0")
    before["channels/c/history/3.json"] = entry(3, "r2", previous="r1")
    before["channels/c/history/4.json"] = before["channels/c.json"] = entry(4, "r2", previous="r1", action="hold", by="manual",
                                                                            held={"at": "t"})
    for run, why in (("r2", "c's holder"), ("r1", "c's rollback target")):
        after = {k: v for k, v in before.items() if not k.startswith(f"{run}/model/")}
        assert problems(after, prev=before)["needed_models_kept"] == [f"run {run}'s model was deleted, yet it is the {why}"]
    # r0 is only named by entries 1 and 2, older than the last QA_KEEP_RUNS=2: retention may take its model
    after = {k: v for k, v in before.items() if not k.startswith("r0/model/")}
    assert problems(after, prev=before) == {}


def test_what_an_unfinished_run_starts_or_learns_from_is_kept():
    before = {**sound(), **complete_run("r0")}
    before["channels/c/starts/r3.json"] = {"run_id": "r3", "from_run": "r0"}
    after = {k: v for k, v in before.items() if not k.startswith("r0/model/")}
    assert "start model of r3" in problems(after, prev=before)["needed_models_kept"][0]
    before = {**sound(), **complete_run("r0")}
    before["r3/run.json"] = {"run_id": "r3", "fingerprint": "fp-r3", "teacher_run": "r0"}
    after = {k: v for k, v in before.items() if not k.startswith("r0/model/")}
    assert "teacher pinned by r3" in problems(after, prev=before)["needed_models_kept"][0]


@pytest.mark.parametrize("change, expected", [
    (lambda f: f.update({"r1/metrics.json": {"f1": 51.0}}), "metrics.json changed after the run was complete"),
    (lambda f: f.update({"r1/model/model.safetensors": "other weights"}), "model/model.safetensors changed"),
    (lambda f: f.pop("r1/COMPLETE"), "lost its COMPLETE marker"),
    (lambda f: f.pop("r1/run.json"), "run.json was deleted"),
])
def test_a_complete_run_is_never_republished(change, expected):
    after = sound()
    change(after)
    assert any(expected in p for p in problems(after, prev=sound())["published_runs_unchanged"]), problems(after, prev=sound())


def test_retention_may_delete_an_unneeded_model_whole():
    before = {**sound(), **complete_run("r0")}
    after = {k: v for k, v in before.items() if not k.startswith("r0/model/")}
    assert problems(after, prev=before) == {}


@pytest.mark.parametrize("breakage, expected", [
    (lambda f: f.pop("r1/manifest.json"), "complete without ['manifest.json']"),
    (lambda f: f.update({"r3/checkpoints/checkpoint-4/model.safetensors": b"torn"}), "checkpoint-4/model.safetensors does not match"),
    (lambda f: f.pop("r3/checkpoints/checkpoint-2/trainer_state.json"), "committed checkpoint-2 lacks trainer_state.json"),
    (lambda f: f.pop("r3/run.json"), "has committed checkpoints [2, 4] but no run.json"),
    (lambda f: f.update({"r3/run.json": b"[]"}), "run.json is not a run record"),
    (lambda f: f.pop("r1/model/model.safetensors"), "config.json is there without model.safetensors"),
    (lambda f: f.update({"r3/lease.json": b"garbage"}), "lease.json is not a lease"),
])
def test_every_run_folder_is_complete_or_resumable(breakage, expected):
    files = sound()
    breakage(files)
    assert any(expected in p for p in problems(files)["run_folders_sound"]), problems(files)


def test_an_unfinished_run_never_loses_its_newest_checkpoint():
    after = {k: v for k, v in sound().items() if "checkpoint-4" not in k}
    assert problems(after, prev=sound())["checkpoint_progress_kept"] == [
        "run r3: newest committed checkpoint went from 4 to 2"]


def test_no_secret_in_any_object():
    files = sound()
    files["r1/manifest.json"] = {"settings": {"endpoint": "https://u:s3cr3tValue99@host"}}
    assert problems(files)["no_secret_in_objects"] == ["r1/manifest.json contains the value of AWS_SECRET_ACCESS_KEY"]


OK = '{"event": "start"}\n{"event": "done"}'


@pytest.mark.parametrize("proc, expected", [
    (Proc("p", "job", 1, OK, "qa-finetune: error: unexpected error: KeyError: x (exit 1)"), "exit_codes_documented"),
    (Proc("p", "job", 135, OK, ""), "exit_codes_documented"),
    (Proc("p", "job", -15, OK, "", signalled=(15,)), "exit_codes_documented"),
    (Proc("p", "channel", -15, "", ""), "exit_codes_documented"),
    (Proc("p", "job", -9, OK, ""), "exit_codes_documented"),
    (Proc("p", "job", 143, OK, "qa-finetune: error: stopped by SIGTERM (exit 143)"), "exit_codes_documented"),
    (Proc("p", "job", 75, OK, "Traceback (most recent call last):"), "one_error_line"),
    (Proc("p", "job", 2, OK, "qa-finetune: error: QA_RUN_ID=x: differs in: lr (exit 2)", refusals=("lease",)), "refusals_expected"),
    (Proc("p", "job", 0, OK + "\nplain text line", ""), "log_lines_json"),
    (Proc("p", "channel", 0, "not json", ""), "log_lines_json"),
    (Proc("p", "job", 0, OK, "warning: key s3cr3tValue99"), "no_secret_in_logs"),
])
def test_each_process_check_catches_its_violation(proc, expected):
    assert expected in {name for name, _ in outcomes.check_process(proc, SECRETS)}


def test_documented_endings_pass_the_process_checks():
    for proc in (Proc("p", "job", 0, OK, ""), Proc("p", "job", -9, OK, "", signalled=(9,)),
                 Proc("p", "job", 143, OK, "qa-finetune: error: stopped (exit 143)", signalled=(15,)),
                 Proc("p", "channel", -15, "", "", signalled=(15,)),
                 Proc("p", "job", 4, OK, "qa-finetune: error: QA_RUN_ID=x is already running (exit 4)", refusals=("already running",)),
                 Proc("p", "channel", 2, "", "qa-finetune channel: error: channel 'c' is already held (exit 2)", refusals=("already held",))):
        assert outcomes.check_process(proc, SECRETS) == []


def test_a_run_whose_last_attempt_did_not_settle_it_is_reported():
    assert outcomes.retries_converged("r", [-9, 75], settled=False)[0][0] == "retries_converge"
    assert outcomes.retries_converged("r", [-9, 0], settled=True) == []


def test_a_run_whose_last_process_ended_holds_no_lease():
    cur = snapshot(sound())  # r3 has a lease.json
    assert outcomes.leases_released(cur, ["r1", "r2"]) == []
    assert outcomes.leases_released(cur, ["r3"]) == [("leases_released", "run r3: lease.json left behind after its last process ended")]


def test_a_resumed_run_must_equal_its_reference():
    assert outcomes.same_as_reference("r", "a" * 64, "a" * 64) == []
    assert outcomes.same_as_reference("r", "a" * 64, "b" * 64)[0][0] == "resumed_equals_reference"


def test_answers_through_every_channel_reports_a_failing_channel():
    assert outcomes.answers_through_every_channel({"c": (0, ""), "d": (2, "no model there")}) == [
        ("answers_through_every_channel", "channel d: job.answer exit 2: no model there")]


def test_a_sigterm_while_the_killer_wraps_the_job_is_the_jobs_stop(tmp_path, tiny_model):
    """The soak sends SIGTERM "at any time"; under the killer the job once had no handler while the killer imported
    the Trainer (seconds), and died of the signal (-15) where ``python -m job`` exits 143."""
    import signal

    from tests.support.jobrun import RunningJob, job_env

    job = RunningJob(job_env(tmp_path, tiny_model), module="tests.support.killer", args=("slow:train_step=0.1",))
    time.sleep(1.0)  # python is up; the Trainer's import takes seconds more
    job.proc.send_signal(signal.SIGTERM)
    result = job.finish()
    assert result.returncode == 143, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the short soak
# At most 6 operations, none started after 60 s: one operation with its retries can take a minute on a
# loaded machine, so the soak adds under two minutes to the suite.
SHORT_SOAK_STEPS, SHORT_SOAK_MINUTES = 6, 1.0


def test_short_soak():
    """A short random history of the real job under faults (its seed is new every run; ``QA_SOAK_SEED`` fixes it)."""
    seed = int(os.environ.get("QA_SOAK_SEED") or random.SystemRandom().randrange(1, 10**9))
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QA_", "AWS_"))}
    result = subprocess.run([sys.executable, "bench/soak.py", "--seed", str(seed), "--steps", str(SHORT_SOAK_STEPS),
                             "--minutes", str(SHORT_SOAK_MINUTES)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    ran = re.search(r"replay this history: (.*)", result.stdout)
    replay = f"replay: {ran.group(1) if ran else f'python bench/soak.py --seed {seed}'} (QA_SOAK_SEED={seed} for this test)"
    assert result.returncode == 0, f"seed {seed}: violations\n{result.stdout[-20000:]}\n{result.stderr[-3000:]}\n{replay}"
    assert "violations: 0" in result.stdout and ran, result.stdout
    print(f"short soak: seed {seed}, {time.monotonic() - started:.0f} s\n{result.stdout}")
