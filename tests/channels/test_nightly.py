"""Nightly retraining end to end: the real job and Trainer on the tiny model, on SeaweedFS and local disk.

One chain of nights per storage, run once (module fixture), then asserted on. On S3:
1) no holder: promoted; 2) same data: unchanged, nothing trained; 3) a new file under the data
prefix, warm-started from the holder: trained, gated (the holder re-scored on the grown eval set),
promoted; 4) a sabotaged candidate: rejected, pointer unchanged; 5) rollback from the command
line; 6) two promotions racing: one winner, the other gated again; 7) SIGKILL at each promotion
step, then a rerun that converges; 8) warm start: the starting model scores exactly what the
holder scored; retention and ``job.answer --channel`` on the result. On local disk, where the
compare-and-swap is a locked file: nights 1 and 2, the base model replaced in place after night 2
(not unchanged; a retry onto it refused), the race, a warm-started night killed after a checkpoint
whose start model is then deleted (its retry resumes), and the warm start.

The eval questions are also training questions: in 30 steps the tiny model learns them well
enough that a sabotaged model is clearly worse, which is what the gate must see.
"""
import datetime as dt
import json
import shutil
import uuid
from pathlib import Path

import pytest

from tests.support.jobrun import DATA, RunningJob, job_env, run_job
from tests.support.tiny import build_tiny_model
from tests.test_job_local import one_line_error

ROWS = (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()
DROP_A, DROP_B = "".join(f"{r}\n" for r in ROWS[:16]), "".join(f"{r}\n" for r in ROWS[16:32])
CHAIN = dict(QA_CHANNEL="production", QA_LEARNING_RATE="1e-2", QA_MAX_STEPS="30", QA_BATCH_SIZE="8",
             QA_CHECKPOINT_STEPS="0", QA_KEEP_RUNS="2", QA_GATE_MAX_DROP="10")
# The race and the kills are about the pointer, not the gate: a tolerance of 100 points passes any candidate.
ANY = dict(QA_GATE_MAX_DROP="100", QA_INIT_FROM="channel")
SEEDS = {"x": 7, "y": 8, "z": 9}  # another seed is another recipe: not "unchanged" against n3


class Place:
    """The output and the data drops on one storage, and a way to read what the job wrote."""

    def __init__(self, kind, tmp: Path, seaweed=None):
        self.kind, self.tmp = kind, tmp
        if kind == "local":
            self.out, self.data, self.env = str(tmp / "out"), str(tmp / "data"), {}
        else:
            from tests.support.s3_fixtures import s3_env

            self.bucket, self.client = f"nightly-{uuid.uuid4().hex[:10]}", seaweed.client()
            self.client.create_bucket(Bucket=self.bucket)
            self.out, self.data, self.env = f"s3://{self.bucket}/out", f"s3://{self.bucket}/data", s3_env(seaweed)

    def drop(self, split, name, text):
        if self.kind == "local":
            (Path(self.data) / split).mkdir(parents=True, exist_ok=True)
            (Path(self.data) / split / name).write_text(text)
        else:
            self.client.put_object(Bucket=self.bucket, Key=f"data/{split}/{name}", Body=text.encode())

    def get(self, key):
        if self.kind == "local":
            path = Path(self.out) / key
            return path.read_bytes() if path.is_file() else None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"out/{key}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def json(self, key):
        raw = self.get(key)
        return json.loads(raw) if raw is not None else None

    def keys(self, prefix):
        if self.kind == "local":
            root = Path(self.out)
            return {p.relative_to(root).as_posix() for p in (root / prefix).rglob("*") if p.is_file()} if (root / prefix).exists() else set()
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"out/{prefix}")
        return {o["Key"][len("out/"):] for page in pages for o in page.get("Contents", [])}

    def history(self):
        seqs = sorted(int(k.rsplit("/", 1)[1][:-5]) for k in self.keys("channels/production/history/"))
        return [self.json(f"channels/production/history/{s}.json") for s in seqs]

    def env_for(self, run_id, **extra):
        # One thread: on 2 shared cores, torch's default threads spin against each other (10x slower steps).
        return job_env(self.tmp, Path(self.tiny), QA_RUN_ID=run_id, QA_OUTPUT_URI=self.out, QA_TRAIN_URI=f"{self.data}/train/",
                       QA_EVAL_URI=f"{self.data}/eval/", OMP_NUM_THREADS="1", **{**CHAIN, **self.env, **extra})


class Chain:
    def __init__(self, place):
        self.place, self.results, self.pointers = place, {}, {}

    def night(self, run_id, killer=None, **extra):
        env = self.place.env_for(run_id, **extra)
        result = run_job(env, module="tests.support.killer", args=(killer,)) if killer else run_job(env)
        return self.record(run_id, result)

    def record(self, name, result):
        self.results[name] = result
        self.pointers[name] = self.place.get("channels/production.json")
        return result

    def together(self, names, killer, **extra):
        """Two runs at once, each with its own work dir (as two pods would have)."""
        jobs = {n: RunningJob({**self.place.env_for(n, **extra), "QA_SEED": str(SEEDS[n]), "QA_WORK_DIR": str(self.place.tmp / f"work-{n}"),
                               "KILLER_MEET_DIR": str(self.place.tmp / f"meet-{killer}")},
                              module="tests.support.killer", args=(killer,)) for n in names}
        return {n: job.finish() for n, job in jobs.items()}


@pytest.fixture(scope="module", params=["local", "s3"])
def chain(request, tmp_path_factory, tiny_model):
    """On S3 every night; on local disk (where compare-and-swap is a locked file) nights 1, 2 and the race."""
    place = Place(request.param, tmp_path_factory.mktemp(f"nightly-{request.param}"),
                  request.getfixturevalue("seaweed") if request.param == "s3" else None)
    place.tiny = shutil.copytree(tiny_model, place.tmp / "base")  # the chain's own: night n2b replaces it
    c = Chain(place)
    place.drop("train", "part-a.jsonl", DROP_A)
    place.drop("train", "_SUCCESS", "")
    place.drop("eval", "part-a.jsonl", DROP_A)
    c.night("n1")
    c.night("n2")
    if place.kind == "local":  # the base model replaced in place, under the same QA_MODEL_NAME
        other = build_tiny_model(place.tmp / "other", seed=1)
        swap_weights(place.tiny, other)
        c.results["n2b-killed"] = c.night("n2b", killer="kill:put_file@1")  # past the plan and the folder's claim
        swap_weights(place.tiny, other)  # back: its retry finds another base model than its first attempt
        c.night("n2b")
    place.drop("train", "part-b.jsonl", DROP_B)
    place.drop("eval", "part-b.jsonl", DROP_B)
    if place.kind == "s3":
        c.night("n3", QA_INIT_FROM="channel")
        c.night("n4", QA_LEARNING_RATE="1e-9")  # practically 0: the candidate is the untrained base model
        c.record("rollback", run_job(place.env, module="job.channel", args=(
            "rollback", "--output", place.out, "--channel", "production", "--reason", "n3 answers badly")))
    c.pointers["before-race"] = place.get("channels/production.json")
    # both read the pointer (their 2nd read: the 1st is the skip-if-unchanged check), then both try to move it
    for name, result in c.together(("x", "y"), "meet:pointer_read@2=2", **ANY).items():
        c.record(name, result)
    if place.kind == "local":  # a warm start killed after its first checkpoint; then its start model goes
        warm = dict(ANY, QA_CHECKPOINT_STEPS="5")
        c.results["w-killed"] = c.night("w", killer="kill:put_bytes:COMMIT.json@2", **warm)
        shutil.rmtree(Path(place.out) / c.place.json("channels/production.json")["run_id"] / "model")
        c.night("w", **warm)
    if place.kind == "s3":  # SIGKILL at each step of promotion, then a rerun that converges
        for step, killer in enumerate(("kill:promote@1", "kill:pointer_read@1", "kill:decided@1", "kill:pointer_write@1", None)):
            c.night("z", killer=killer, QA_SEED=str(SEEDS["z"]), **ANY)
            c.results[f"z{step}"], c.pointers[f"z{step}"] = c.results["z"], c.pointers["z"]
    return c


def swap_weights(a: Path, b: Path) -> None:
    (a / "model.safetensors").rename(a / "swap")
    (b / "model.safetensors").rename(a / "model.safetensors")
    (a / "swap").rename(b / "model.safetensors")


def needs(chain, step):
    if step not in chain.results:
        pytest.skip(f"{step} is not part of the chain on {chain.place.kind} storage")


def succeeded(result):
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return result


def promotion(result):
    (event,) = result.event("promotion")
    return event


def seconds(result):
    """The job's own time, from its first log line to its last (interpreter start-up excluded)."""
    stamps = [dt.datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ") for e in result.events if "ts" in e]
    return (stamps[-1] - stamps[0]).total_seconds()


def test_first_night_without_holder_is_promoted(chain):
    result, place = succeeded(chain.results["n1"]), chain.place
    assert promotion(result)["decision"] == "promote" and promotion(result)["pointer_moved"]
    assert promotion(result)["reason"] == "first_model"
    pointer = json.loads(chain.pointers["n1"])
    assert (pointer["seq"], pointer["run_id"], pointer["previous"], pointer["promoted_by"]) == (1, "n1", None, "nightly")
    assert pointer["model_uri"].endswith("/n1/model") and pointer["metrics"]["f1"] == place.json("n1/metrics.json")["f1"]
    assert place.get("channels/production/history/1.json") == chain.pointers["n1"]
    decided = place.json("n1/promotion.json")
    assert decided["decision"] == "promote" and decided["gate"]["candidate"] == pytest.approx(pointer["metrics"]["f1"], abs=1e-3)
    assert result.event("data_files_skipped")[0]["files"] == ["_SUCCESS"]


def test_same_data_is_unchanged_and_nothing_trains(chain):
    result, place = succeeded(chain.results["n2"]), chain.place
    (unchanged,) = result.event("unchanged")
    assert unchanged["same_as"] == "n1"
    for stage in ("features", "train_start", "eval", "published", "promotion"):
        assert not result.event(stage), stage
    assert chain.pointers["n2"] == chain.pointers["n1"]
    assert place.json("n2/promotion.json")["decision"] == "unchanged" and place.get("n2/COMPLETE") is None
    if place.kind == "local":
        # On S3 both nights first pay ~0.3 s of client set-up and lease, which is a tenth of this tiny
        # model's whole night 1; on local disk the night's own work is all there is to compare.
        assert seconds(result) < seconds(chain.results["n1"]) / 10, (seconds(result), seconds(chain.results["n1"]))


def test_a_base_model_replaced_in_place_is_not_unchanged_and_no_retry_resumes_onto_it(chain):
    """The recipe and fingerprint once knew QA_MODEL_NAME by name: same folder, new weights, `unchanged`."""
    needs(chain, "n2b")
    killed, place = chain.results["n2b-killed"], chain.place
    assert killed.returncode == -9 and not killed.event("unchanged") and killed.event("fault_injected")
    base_model = place.json("n2b/run.json")["inputs"]["base_model"]
    assert base_model.startswith("sha256:") and base_model != place.json("n1/run.json")["inputs"]["base_model"]
    one_line_error(chain.results["n2b"], 2, "differs in: base_model")


def test_a_warm_started_retry_resumes_from_its_checkpoint_when_its_start_model_is_gone(chain):
    """The retry once exited 2 fetching the pruned start model, although its checkpoint held the weights."""
    needs(chain, "w-killed")
    killed, retry = chain.results["w-killed"], succeeded(chain.results["w"])
    assert killed.returncode == -9 and killed.event("checkpoint_committed")
    step = killed.event("checkpoint_committed")[-1]["step"]
    assert retry.event("init_from_checkpoint")[0]["step"] == step and retry.event("resume")[0]["step"] == step
    assert retry.event("published") and promotion(retry)["pointer_moved"]


def test_new_file_is_trained_gated_against_the_rescored_holder_and_promoted(chain):
    needs(chain, "n3")
    result, place = succeeded(chain.results["n3"]), chain.place
    assert [e["files"] for e in result.event("data")][:2] == [2, 2] and result.event("train_start")
    (rescored,) = result.event("holder_rescored")  # the eval set grew: n1 was scored again on it
    assert rescored["holder"] == "n1" and rescored["examples"] == 32
    event = promotion(result)
    assert event["decision"] == "promote" and event["pointer_moved"] and event["reason"] == "not_worse"
    assert event["holder_run_id"] == "n1"
    assert event["interval"][0] >= -10 and event["holder"] == pytest.approx(rescored["f1"], abs=1e-3)
    pointer = json.loads(chain.pointers["n3"])
    assert (pointer["seq"], pointer["run_id"], pointer["previous"], pointer["warm_starts"]) == (2, "n3", "n1", 1)
    init = place.json("n3/run.json")["inputs"]["init"]
    assert (init["from"], init["run_id"], init["warm_starts"]) == ("channel", "n1", 1)


def test_sabotaged_candidate_is_rejected_and_the_pointer_stays(chain):
    needs(chain, "n4")
    result, place = succeeded(chain.results["n4"]), chain.place  # a rejection is not a failure
    event = promotion(result)
    assert event["decision"] == "reject" and not event["pointer_moved"] and event["reason"] == "regression"
    assert event["holder_run_id"] == "n3"
    assert event["interval"][1] < -10
    assert chain.pointers["n4"] == chain.pointers["n3"]
    decided = place.json("n4/promotion.json")
    assert decided["decision"] == "reject" and decided["holder"]["scored_from"] == "published predictions"
    assert place.get("n4/COMPLETE") is not None  # still a published, complete run


def test_rollback_puts_the_previous_holder_back_with_history(chain):
    needs(chain, "rollback")
    result = succeeded(chain.results["rollback"])
    pointer = json.loads(chain.pointers["rollback"])
    assert json.loads(result.stdout) == pointer
    assert (pointer["seq"], pointer["run_id"], pointer["previous"], pointer["action"]) == (3, "n1", "n3", "rollback")
    assert pointer["promoted_by"] == "manual" and pointer["reason"] == "n3 answers badly"
    history = chain.place.history()
    assert [(e["seq"], e["run_id"]) for e in history[:3]] == [(1, "n1"), (2, "n3"), (3, "n1")]


def test_racing_promotions_one_winner_the_other_gated_again(chain):
    x, y = succeeded(chain.results["x"]), succeeded(chain.results["y"])
    (loser,) = [r for r in (x, y) if r.event("promotion_conflict")]
    winner = y if loser is x else x
    won, lost = promotion(winner), promotion(loser)
    before = json.loads(chain.pointers["before-race"])
    assert won["holder_run_id"] == before["run_id"] and won["seq"] == before["seq"] + 1
    assert lost["holder_run_id"] == won["run_id"] and lost["seq"] == before["seq"] + 2  # gated again, against the winner
    assert chain.place.json(f"{lost['run_id']}/promotion.json")["attempt"] == 2
    history = chain.place.history()
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    assert [e["run_id"] for e in history[before["seq"]:before["seq"] + 2]] == [won["run_id"], lost["run_id"]]
    for older, newer in zip(history, history[1:]):
        assert newer["previous"] == older["run_id"]


def test_sigkill_at_each_promotion_step_leaves_a_valid_pointer_and_a_rerun_converges(chain):
    needs(chain, "z0")
    from job.channels.channel import Channel
    from job.store.storage import LocalStorage

    check = Channel(LocalStorage(Path("unused")), "production")
    place, before = chain.place, chain.pointers["y"]
    holder = json.loads(before)["run_id"]
    for step in ("z0", "z1", "z2", "z3"):
        result = chain.results[step]
        assert result.returncode == -9 and result.event("fault_injected"), (step, result.stderr[-2000:])
        pointer = check.parse(chain.pointers[step], step)  # raises unless a whole, valid pointer
        assert place.get(f"{pointer['run_id']}/COMPLETE") is not None  # always a complete run
    for step in ("z0", "z1", "z2"):  # before the pointer write: the old holder
        assert chain.pointers[step] == before
    assert place.json("z/promotion.json")["decision"] == "promote"
    moved = json.loads(chain.pointers["z3"])  # killed after the pointer write, before its history entry
    assert moved["run_id"] == "z" and moved["previous"] == holder
    last = succeeded(chain.results["z4"])
    assert promotion(last)["recorded_earlier"] and not promotion(last)["pointer_moved"]
    assert chain.pointers["z4"] == chain.pointers["z3"]
    history = place.history()
    assert history[-1] == moved and [e["seq"] for e in history] == list(range(1, moved["seq"] + 1))


def test_warm_start_begins_exactly_where_the_holder_is(chain, tmp_path, monkeypatch):
    """The model a warm start loads scores exactly what the holder scored on the same questions."""
    import datasets
    import torch

    from job.channels.nightly import Night, init_model
    from job.data import load_split
    from job.evaluate import evaluate
    from job.settings import load_settings
    from job.squad.features import eval_features
    from job.store.storage import RetryPolicy
    from job.train import build_trainer, load_model, training_arguments

    place = chain.place
    pointer = place.json("channels/production.json")
    env = place.env_for("warm-check", QA_INIT_FROM="channel", QA_WORK_DIR=str(tmp_path))
    for k, v in place.env.items():
        monkeypatch.setenv(k, v)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("QA_")})
    night = Night({"from": "channel", "run_id": pointer["run_id"], "warm_starts": pointer["warm_starts"] + 1})
    tokenizer, model = load_model(init_model(settings, night), settings.seed)
    rows = list(load_split("eval", settings, RetryPolicy()).rows)  # the Arrow table's rows, as dicts
    features = datasets.Dataset.from_dict(eval_features(tokenizer, rows, settings.max_length, settings.doc_stride))
    trainer = build_trainer(settings, model, tokenizer, None, training_arguments(settings, tmp_path / "t", "fp32"), [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs ran (OMP_NUM_THREADS=1): the same summation order, the same logits
    try:
        scores, predictions = evaluate(trainer, features, rows, settings)
    finally:
        torch.set_num_threads(threads)
    assert predictions == place.json(f"{pointer['run_id']}/predictions.json")
    assert scores["f1"] == pointer["metrics"]["f1"] and scores["exact_match"] == pointer["metrics"]["exact_match"]


def test_retention_keeps_records_and_protected_models(chain):
    needs(chain, "n4")
    place = chain.place
    assert succeeded(chain.results["n4"]).event("retention")
    for name in ("metrics.json", "predictions.json", "manifest.json", "run.json", "promotion.json", "COMPLETE"):
        assert place.get(f"n4/{name}") is not None, name
    for part in ("checkpoints/", "cache/", "model/"):  # n4: old, never a holder
        assert not place.keys(f"n4/{part}"), part
    holder = place.json("channels/production.json")["run_id"]
    assert place.get(f"{holder}/model/config.json") is not None
    recent = {e[k] for e in place.history()[-2:] for k in ("run_id", "previous", "rollback_to") if e[k]}
    for run in recent:
        assert place.get(f"{run}/model/model.safetensors") is not None, run
    assert not place.keys("n1/checkpoints/") and place.get("n1/metrics.json") is not None


def test_answer_with_the_model_a_channel_names(chain, monkeypatch, capsys):
    needs(chain, "z0")  # once is enough: S3
    from job.answer import main

    for k, v in chain.place.env.items():
        monkeypatch.setenv(k, v)
    assert main(["--model", chain.place.out, "--channel", "production", "--question", "Who won?",
                 "--context", "The Denver Broncos won Super Bowl 50."], environ=chain.place.env) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == chain.place.json("channels/production.json")["run_id"]


def test_prefix_with_only_unsupported_files_is_a_data_error(tmp_path, tiny_model):
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "_SUCCESS").write_text("")
    env = job_env(tmp_path, tiny_model, QA_CHANNEL="production", QA_TRAIN_URI=f"{tmp_path / 'drops'}/")
    one_line_error(run_job(env), 3, "no data files under this prefix")
    assert not (tmp_path / "out" / "channels").exists()


def test_warm_starts_in_a_row_are_limited():
    from job.channels.nightly import choose_init
    from job.settings import load_settings

    settings = load_settings({"QA_CHANNEL": "production", "QA_INIT_FROM": "channel", "QA_WARM_START_LIMIT": "2"})
    holder = {"run_id": "n7", "fingerprint": "fp", "warm_starts": 1}
    init, _ = choose_init(settings, holder)
    assert (init["from"], init["run_id"], init["warm_starts"]) == ("channel", "n7", 2)
    init, why = choose_init(settings, {**holder, "warm_starts": 2})
    assert init == {"from": "base", "warm_starts": 0} and "QA_WARM_START_LIMIT=2" in why
    assert choose_init(settings, None)[0]["from"] == "base"
    assert choose_init(load_settings({"QA_CHANNEL": "production"}), holder)[0]["from"] == "base"
