"""Peak memory and preprocessing time of the real job against the number of training rows, before and after.

The job (``python -m job``) runs with the tiny DistilBERT-shaped model of ``tests/support/tiny.py``
(so the data, not the model, is what costs), one optimizer step, one preprocessing worker, the
default 384/128 windows, and a fixed eval set (the first ``--eval-rows`` dev-sample rows). The
train set is the 15,304-row train sample repeated 1, 4 and 16 times, every copy with fresh ids.
Each size runs twice side by side, interleaved: **before** (the job's code at ``--before``, by
default the commit before issue 17, unpacked with ``git archive``) and **after** (this checkout).

Printed per run: peak resident memory (the kernel's high-water mark of the process, ``ru_maxrss``,
which counts the memory-mapped file pages the process read, too), the peak of its anonymous
memory (its own heap, sampled every 50 ms: what an OOM kill is about), the work dir's size at
the end (scratch: downloaded data, the rows' Arrow files, features and the datasets cache), the seconds to load the
data (start to the last ``data`` line) and to build the features (last ``data`` line to the
``features`` line: tokenizer load, windows, labels, the cache written and read back), each also
as the process's CPU seconds (user + system, all threads), which other work on a shared machine
disturbs far less than wall time; then the slopes between the smallest and the largest size
(memory per additional row, seconds per row)
and what they make of a million and ten million rows. At the smallest size the two runs' feature
cache keys and their cached windows (every column of train and eval, row for row) are compared.

``--listing-files N`` (default 20,000) also times loading a folder of N one-row files before and
after (issue 15, item 12: the listing was quadratic). ``--sizes`` takes multiples of the sample.

Usage: python bench/scale.py [--sizes 1,4,16] [--eval-rows 200] [--listing-files 20000] [--before REF] [--keep]
       python bench/scale.py --sample-rows 1000 --sizes 1,2 --listing-files 500   (a smoke run, ~2 min)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, ROOT, TRAIN_FILE, data_file, header

BEFORE = "0922ab8"  # main just before issue 17 (rows as Python dicts)
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def unpack(ref: str, dest: Path) -> Path:
    """The ``job`` package as it was at ``ref``, without touching this checkout."""
    archive = subprocess.run(["git", "archive", ref, "job"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def write_train(rows: list[str], copies: int, path: Path) -> int:
    """The sample ``copies`` times; copy k > 0 has ids ``<id>-r<k>``, so every id is fresh."""
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for line in rows:
                if copy:
                    row = json.loads(line)
                    row["id"] = f"{row['id']}-r{copy}"
                    line = json.dumps(row, ensure_ascii=False)
                f.write(line.rstrip("\n") + "\n")
    return copies * len(rows)


class Measured:
    """One child process: events with arrival times, peak RSS from wait4, anonymous memory sampled."""

    def __init__(self, argv: list[str], env: dict, cwd: Path, stderr: Path):
        full = {k: os.environ[k] for k in _KEEP if k in os.environ}
        full.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(cwd),
                     "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
        full.update(env)
        self.err = open(stderr, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        self.events: list[dict] = []
        self.peak_anon_kb = 0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_anon_kb = max(self.peak_anon_kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    def _cpu_seconds(self) -> float:
        """User + system CPU seconds of the child so far (all its threads): what the work cost, whatever else ran."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def wait(self) -> tuple[int, int]:
        """(exit code, peak RSS in KB)."""
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"], event["_cpu"] = time.monotonic() - self.t0, self._cpu_seconds()
            self.events.append(event)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.wall = time.monotonic() - self.t0
        self.err.close()
        self._sampler.join(1)
        return self.proc.returncode, usage.ru_maxrss

    def at(self, name: str, last: bool = False) -> dict:
        found = [e for e in self.events if e.get("event") == name]
        if not found:
            raise RuntimeError(f"no {name!r} event")
        return found[-1] if last else found[0]


def run_job(code: Path, tmp: Path, label: str, train: Path, dev: Path, model: Path) -> dict:
    out, work = tmp / f"out-{label}", tmp / f"work-{label}"
    env = {"QA_RUN_ID": "scale", "QA_MODEL_NAME": str(model), "QA_TRAIN_URI": str(train), "QA_EVAL_URI": str(dev),
           "QA_OUTPUT_URI": str(out), "QA_WORK_DIR": str(work), "QA_MAX_STEPS": "1", "QA_BATCH_SIZE": "12",
           "QA_PREPROCESS_WORKERS": "1", "QA_DATALOADER_WORKERS": "0", "QA_CHECKPOINT_STEPS": "0",
           "QA_CHECKPOINT_MINUTES": "0", "QA_REPORT_TO": "none", "QA_LOG_FORMAT": "json", "QA_EXPORT": "none",
           "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    run = Measured([sys.executable, "-m", "job"], env, code, tmp / f"{label}.stderr")
    rc, peak_kb = run.wait()
    if rc != 0:
        tail = (tmp / f"{label}.stderr").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{label}: exit {rc}\n{tail}")
    data, features = run.at("data", last=True), run.at("features")
    scratch = sum(p.stat().st_size for p in work.rglob("*") if p.is_file() and not p.is_symlink())
    return {"label": label, "peak_mb": peak_kb / 1024, "anon_mb": run.peak_anon_kb / 1024, "load_s": data["_t"],
            "scratch_mb": scratch / 2**20, "load_cpu": data["_cpu"], "features_cpu": features["_cpu"] - data["_cpu"],
            "features_s": features["_t"] - data["_t"], "wall_s": run.wall, "windows": features["train_windows"],
            "cache_key": features["cache_key"], "cache": out / "scale" / "cache" / f"features-{features['cache_key']}"}


def same_tables(a: Path, b: Path) -> str:
    import pyarrow.parquet as pq

    verdicts = []
    for name in ("train.parquet", "eval.parquet"):
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        verdicts.append(f"{name} {'identical' if ta.equals(tb) else 'DIFFERENT'} ({ta.num_rows:,} windows)")
    return ", ".join(verdicts)


def listing(code: Path, tmp: Path, label: str, folder: Path) -> float:
    probe = ("import time; from job.data import load_split; from job.settings import load_settings; "
             "from job.store.storage import RetryPolicy; "
             f"s = load_settings({{'QA_TRAIN_URI': {str(folder)!r}, 'QA_WORK_DIR': {str(tmp / ('work-list-' + label))!r}}}); "
             "t = time.monotonic(); load_split('train', s, RetryPolicy()); print(time.monotonic() - t)")
    run = Measured([sys.executable, "-c", probe], {}, code, tmp / f"list-{label}.stderr")
    run.proc.wait()
    out = run.proc.stdout.read().strip()
    run.err.close()
    return float(out.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16", help="train sizes, in copies of the 15,304-row sample")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--sample-rows", type=int, default=0, help="use only the first N sample rows (a quick smoke run)")
    parser.add_argument("--listing-files", type=int, default=20000, help="one-row files for the listing timing; 0 = skip")
    parser.add_argument("--before", default=BEFORE, help="git ref of the code to compare against")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    train_lines = data_file(TRAIN_FILE).read_text(encoding="utf-8").splitlines()[:args.sample_rows or None]
    dev_lines = data_file(DEV_FILE).read_text(encoding="utf-8").splitlines()[:args.eval_rows]
    header("scale.py: peak memory and preprocessing time against training rows, before and after")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    started = time.monotonic()
    try:
        before, after = unpack(args.before, tmp / "before"), ROOT
        print(f"before: {args.before} ({subprocess.run(['git', 'rev-parse', '--short', args.before], cwd=ROOT, capture_output=True, text=True).stdout.strip()}), "
              f"after: this checkout ({subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()})")
        from tests.support.tiny import build_tiny_model

        model = build_tiny_model(tmp / "tiny")
        dev = tmp / "dev.jsonl"
        dev.write_text("\n".join(dev_lines) + "\n", encoding="utf-8")
        results: dict[int, dict[str, dict]] = {}
        for i, copies in enumerate(int(c) for c in args.sizes.split(",")):
            train = tmp / f"train-{copies}.jsonl"
            rows = write_train(train_lines, copies, train)
            order = (("before", before), ("after", after)) if i % 2 == 0 else (("after", after), ("before", before))
            for name, code in order:
                results.setdefault(rows, {})[name] = run_job(code, tmp, f"{name}-{rows}", train, dev, model)
                r = results[rows][name]
                print(f"  {rows:>9,} rows  {name:<6}  peak {r['peak_mb']:8.0f} MB  anon {r['anon_mb']:8.0f} MB  "
                      f"load {r['load_s']:6.1f} s ({r['load_cpu']:6.1f} CPU s)  features {r['features_s']:6.1f} s "
                      f"({r['features_cpu']:6.1f} CPU s)  wall {r['wall_s']:6.1f} s  "
                      f"scratch {r['scratch_mb']:6.0f} MB  {r['windows']:,} windows", flush=True)
            train.unlink()
            for name in ("before", "after"):
                shutil.rmtree(tmp / f"work-{name}-{rows}", ignore_errors=True)
        report(results, args.eval_rows)
        if args.listing_files:
            folder = tmp / "many"
            folder.mkdir()
            for n in range(args.listing_files):
                (folder / f"part-{n:06d}.jsonl").write_text(train_lines[n % len(train_lines)].replace('"id": "', f'"id": "f{n}-', 1) + "\n")
            print(f"\nloading a folder of {args.listing_files:,} one-row files (load_split in a fresh process):")
            times = {name: listing(code, tmp, name, folder) for name, code in (("before", before), ("after", after))}
            print(f"  before {times['before']:.1f} s, after {times['after']:.1f} s ({times['before'] / times['after']:.1f}x)")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbenchmark wall time: {(time.monotonic() - started) / 60:.1f} min")
    return 0


def report(results: dict[int, dict[str, dict]], eval_rows: int) -> None:
    sizes = sorted(results)
    small, large = sizes[0], sizes[-1]
    print("\n| train rows | variant | peak RSS MB | peak anonymous MB | load s (CPU s) | features s (CPU s) | scratch MB | train windows |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in sizes:
        for name in ("before", "after"):
            r = results[rows][name]
            print(f"| {rows:,} | {name} | {r['peak_mb']:,.0f} | {r['anon_mb']:,.0f} | {r['load_s']:.1f} ({r['load_cpu']:.1f}) "
                  f"| {r['features_s']:.1f} ({r['features_cpu']:.1f}) | {r['scratch_mb']:,.0f} | {r['windows']:,} |")
    a, b = results[small]["before"], results[small]["after"]
    print(f"\nat {small:,} rows: cache key before {a['cache_key']}, after {b['cache_key']}: "
          f"{'identical' if a['cache_key'] == b['cache_key'] else 'DIFFERENT'}; {same_tables(a['cache'], b['cache'])}")
    if small == large:
        return
    span = large - small
    print(f"\nslopes from {small:,} to {large:,} rows (eval set fixed at {eval_rows} rows):")
    for name in ("before", "after"):
        lo, hi = results[small][name], results[large][name]
        per_row_kb = (hi["peak_mb"] - lo["peak_mb"]) * 1024 / span
        anon_kb = (hi["anon_mb"] - lo["anon_mb"]) * 1024 / span
        load_ms = (hi["load_s"] - lo["load_s"]) * 1000 / span
        feat_ms = (hi["features_s"] - lo["features_s"]) * 1000 / span
        disk_kb = (hi["scratch_mb"] - lo["scratch_mb"]) * 1024 / span
        cpu_ms = (hi["load_cpu"] + hi["features_cpu"] - lo["load_cpu"] - lo["features_cpu"]) * 1000 / span
        print(f"  {name:<6}  {per_row_kb:6.2f} KB peak RSS/row  {anon_kb:6.2f} KB anonymous/row  "
              f"{load_ms:.3f} ms load/row  {feat_ms:.3f} ms features/row  {cpu_ms:.3f} CPU ms load+features/row  "
              f"{disk_kb:.2f} KB scratch/row")
        for n in (1_000_000, 10_000_000):
            gb = (lo["peak_mb"] + (hi["peak_mb"] - lo["peak_mb"]) * (n - small) / span) / 1024
            minutes = (lo["load_s"] + lo["features_s"] + (hi["load_s"] + hi["features_s"] - lo["load_s"] - lo["features_s"]) * (n - small) / span) / 60
            cpu_minutes = cpu_ms * n / 60000
            print(f"          {n:>10,} rows: ~{gb:5.1f} GB peak RSS, ~{minutes:6.1f} min to load and preprocess "
                  f"(~{cpu_minutes:.0f} CPU min of per-row work)")


if __name__ == "__main__":
    sys.exit(main())
