"""The Kubernetes manifests in k8s/, rendered and checked with the real tools.

Each check (tests/support/k8s_checks.py) is a function from rendered documents to a list of
problems. The tests assert that the real manifests have none, and that a deliberately broken
copy of them has some, so no check passes vacuously.
"""
from __future__ import annotations

import copy

import pytest

from job import errors, settings
from job.predictions import settings as predict_settings
from tests.support.k8s_checks import (
    CHECKS,
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    QA_NAME,
    ROOT,
    check_cronjobs,
    check_grace,
    check_images_pinned,
    check_indexed_jobs,
    check_kinds,
    check_pod_failure_policy,
    check_pytorchjobs,
    check_qa_variables,
    check_references,
    check_resources,
    check_restart_policy,
    check_restricted,
    check_run_id,
    check_service_links,
    check_settings_load,
    check_writable_paths,
    kubernetes_validate,
    main_container,
    parse_cron,
    pod_templates,
    render,
    workloads,
)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


def test_claimed_versions_have_their_own_schemas():
    # kubernetes-validate silently uses the newest schema not newer than the one asked for.
    from kubernetes_validate import utils

    available = {utils.major_minor(v) for v in utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= available, sorted(available)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_one_workload(rendered, kustomization):
    assert len(list(workloads(rendered[kustomization]))) == 1


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubernetes_validate_strict(rendered, kustomization, tmp_path):
    assert kubernetes_validate(rendered[kustomization], tmp_path) == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_manifests_pass(rendered, kustomization, check):
    assert check(rendered[kustomization]) == []


def test_qa_names_in_k8s_sources_are_settings():
    # comments and the README included: a renamed setting must not linger anywhere
    known = settings.known_variables() | predict_settings.known_variables()
    found = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in K8S.rglob("*") if path.is_file()
        for name in QA_NAME.findall(path.read_text())
    }
    assert found, "no QA_ names found under k8s/"
    assert sorted(f"{p}: {n}" for p, n in found if n not in known) == []


def test_nightly_runs_the_base_job_unchanged(rendered):
    (job,) = [d for d in rendered["base"] if d["kind"] == "Job"]
    (cron,) = [d for d in rendered["overlays/nightly"] if d["kind"] == "CronJob"]
    nightly = copy.deepcopy(cron["spec"]["jobTemplate"]["spec"])
    # the one intended difference: the settings ConfigMap, the base one plus the channel and its gate
    (ref,) = main_container(nightly["template"])["envFrom"]
    (cm,) = [d for d in rendered["overlays/nightly"] if d["kind"] == "ConfigMap"]
    assert ref["configMapRef"]["name"] == cm["metadata"]["name"]
    main_container(nightly["template"])["envFrom"] = main_container(job["spec"]["template"])["envFrom"]
    assert nightly == job["spec"]
    base = _configmap(rendered["base"])
    assert {k: v for k, v in cm["data"].items() if k in base} == base
    assert cm["data"]["QA_CHANNEL"] and {k for k in cm["data"] if k not in base} >= {"QA_CHANNEL", "QA_GATE_MAX_DROP"}


def test_multi_node_workers_run_the_multi_gpu_pod(rendered):
    (job,) = [d for d in rendered["overlays/multi-gpu"] if d["kind"] == "Job"]
    (pj,) = [d for d in rendered["overlays/multi-node"] if d["kind"] == "PyTorchJob"]
    worker = copy.deepcopy(pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"])
    single = copy.deepcopy(job["spec"]["template"])
    # the three intended differences (job-to-pytorchjob.yaml)
    for template in (worker, single):
        template["spec"].pop("restartPolicy")
        c = main_container(template)
        c.pop("ports", None)
        c["env"] = [v for v in c["env"] if v["name"] != "QA_RUN_ID"]
    assert worker == single


@pytest.mark.parametrize(
    "expr",
    ["30 1 * * *", "*/15 0-6 1,15 JAN-MAR mon-fri", "0 0 ? * SUN", "0 12 1-31/2 * 7", "5,10-20/5 * * 12 0"],
)
def test_parse_cron_accepts(expr):
    assert all(parse_cron(expr))


@pytest.mark.parametrize(
    "expr",
    ["30 1 * *", "30 1 * * * *", "60 1 * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "*/0 * * * *",
     "5-1 * * * *", "@daily", "TZ=UTC 0 1 * * *", "0 0 * * MOON", "? * * * *", "a * * * *"],
)
def test_parse_cron_rejects(expr):
    with pytest.raises(ValueError):
        parse_cron(expr)


# --------------------------------------------------------------------------- the checks can fail


def _main(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc, pod_templates(doc)[0], main_container(pod_templates(doc)[0])


def _set_env(container, name, value):
    container["env"] = [v for v in container.get("env", []) if v["name"] != name] + [{"name": name, "value": value}]


def _configmap(docs):
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"]


def _add_kind(docs):
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})


def _unknown_setting_in_configmap(docs):
    _configmap(docs)["QA_EPOCH"] = "3"


def _device_auto_on_a_gpu_pod(docs):
    _configmap(docs)["QA_DEVICE"] = "auto"


def _unknown_setting_in_env(docs):
    _set_env(_main(docs, "Job")[2], "QA_LEARNING_RATES", "1e-4")


def _service_links_on(docs):
    _main(docs, "PyTorchJob")[1]["spec"].pop("enableServiceLinks")


def _invalid_setting(docs):
    _configmap(docs)["QA_DOC_STRIDE"] = "400"  # not smaller than QA_MAX_LENGTH


def _failjob_on_unavailable(docs):
    _main(docs, "Job")[0]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"].append(
        errors.EXIT_CODES["unavailable"])


def _no_disruption_rule(docs):
    rules = _main(docs, "Job")[0]["spec"]["podFailurePolicy"]["rules"]
    rules[:] = [r for r in rules if "onPodConditions" not in r]


def _restart_on_failure(docs):
    _main(docs, "Job")[1]["spec"]["restartPolicy"] = "OnFailure"


def _six_field_schedule(docs):
    _main(docs, "CronJob")[0]["spec"]["schedule"] = "0 30 1 * * *"


def _bad_time_zone(docs):
    _main(docs, "CronJob")[0]["spec"]["timeZone"] = "Europe/Atlantis"


def _tag_only_image(docs):
    c = _main(docs, "Job")[2]
    c["image"] = c["image"].split("@")[0]


def _may_escalate(docs):
    _main(docs, "Job")[2]["securityContext"]["allowPrivilegeEscalation"] = True


def _pod_runs_as_root(docs):
    _main(docs, "PyTorchJob")[1]["spec"]["securityContext"]["runAsUser"] = 0


def _grace_too_short(docs):
    _configmap(docs)["QA_STOP_GRACE_SECONDS"] = "180"


def _torchrun_default_shutdown(docs):
    c = _main(docs, "Job")[2]
    c["env"] = [v for v in c["env"] if v["name"] != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]


def _fixed_run_id(docs):
    _set_env(_main(docs, "Job")[2], "QA_RUN_ID", "run-1")


def _run_id_from_job_label_in_pytorchjob(docs):
    c = _main(docs, "PyTorchJob")[2]
    (var,) = [v for v in c["env"] if v["name"] == "QA_RUN_ID"]
    var["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.labels['batch.kubernetes.io/job-name']"


def _work_dir_on_root_fs(docs):
    _configmap(docs)["QA_WORK_DIR"] = "/home/app/work"


def _shm_on_disk(docs):
    (shm,) = [v for v in _main(docs, "Job")[1]["spec"]["volumes"] if v["name"] == "dshm"]
    shm["emptyDir"].pop("medium")


def _no_cpu_limit(docs):
    _main(docs, "Job")[2]["resources"]["limits"].pop("cpu")


def _more_gpus_than_ranks(docs):
    _main(docs, "Job")[2]["resources"]["limits"]["nvidia.com/gpu"] = 8


def _unhashed_configmap_name(docs):
    c = _main(docs, "PyTorchJob")[2]
    c["envFrom"][0]["configMapRef"]["name"] = "qa-finetune-settings"


def _pytorchjob_field_typo(docs):
    elastic = _main(docs, "PyTorchJob")[0]["spec"]["elasticPolicy"]
    elastic["nProcPerNod"] = elastic.pop("nProcPerNode")


def _pytorchjob_pod_field_typo(docs):
    _main(docs, "PyTorchJob")[2]["imagePullPolicyy"] = "IfNotPresent"


def _pytorchjob_wrong_type(docs):
    _main(docs, "PyTorchJob")[0]["spec"]["elasticPolicy"]["minReplicas"] = "2"


def _elastic_world_size(docs):
    _main(docs, "PyTorchJob")[0]["spec"]["elasticPolicy"]["maxReplicas"] = 4


def _shards_not_completions(docs):
    _configmap(docs)["QA_PREDICT_SHARDS"] = "2"


def _not_indexed(docs):
    _main(docs, "Job")[0]["spec"]["completionMode"] = "NonIndexed"


def _one_failed_shard_tolerated(docs):
    _main(docs, "Job")[0]["spec"]["maxFailedIndexes"] = 1


def _training_setting_for_predictions(docs):
    _configmap(docs)["QA_EPOCHS"] = "2"


def _cuda_without_a_gpu(docs):
    _configmap(docs)["QA_DEVICE"] = "cuda"


def _predict_grace_too_short(docs):
    _main(docs, "Job")[1]["spec"]["terminationGracePeriodSeconds"] = 60


BREAKAGES = [
    (check_kinds, "base", _add_kind, "kind not covered"),
    (check_qa_variables, "base", _unknown_setting_in_configmap, "QA_EPOCH: not a setting"),
    (check_qa_variables, "base", _unknown_setting_in_env, "QA_LEARNING_RATES: not a setting"),
    (check_service_links, "overlays/multi-node", _service_links_on, "enableServiceLinks is not false"),
    (check_settings_load, "base", _invalid_setting, "QA_DOC_STRIDE"),
    (check_pod_failure_policy, "base", _failjob_on_unavailable, "exit codes by action"),
    (check_pod_failure_policy, "base", _no_disruption_rule, "DisruptionTarget"),
    (check_restart_policy, "base", _restart_on_failure, "restartPolicy 'OnFailure'"),
    (check_cronjobs, "overlays/nightly", _six_field_schedule, "expected 5 fields"),
    (check_cronjobs, "overlays/nightly", _bad_time_zone, "not an IANA zone"),
    (check_images_pinned, "base", _tag_only_image, "is not registry/path[:tag]@sha256"),
    (check_restricted, "base", _may_escalate, "allowPrivilegeEscalation"),
    (check_restricted, "overlays/multi-node", _pod_runs_as_root, "runAsUser 0"),
    (check_grace, "base", _grace_too_short, "terminationGracePeriodSeconds 180 <= QA_STOP_GRACE_SECONDS 180"),
    (check_grace, "overlays/multi-gpu", _torchrun_default_shutdown, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT 30"),
    (check_run_id, "base", _fixed_run_id, "QA_RUN_ID set to a fixed value"),
    (check_run_id, "overlays/multi-node", _run_id_from_job_label_in_pytorchjob, "training.kubeflow.org/job-name"),
    (check_writable_paths, "base", _work_dir_on_root_fs, "QA_WORK_DIR=/home/app/work is not on a writable emptyDir"),
    (check_writable_paths, "base", _shm_on_disk, "/dev/shm is not a sized memory emptyDir"),
    (check_resources, "base", _no_cpu_limit, "no cpu in resources.limits"),
    (check_resources, "overlays/multi-gpu", _more_gpus_than_ranks, "8 GPUs but torchrun --nproc_per_node=4"),
    (check_resources, "overlays/nightly", _device_auto_on_a_gpu_pod, "QA_DEVICE=auto on a GPU pod"),
    (check_references, "overlays/multi-node", _unhashed_configmap_name, "refers to ConfigMap 'qa-finetune-settings'"),
    (check_settings_load, "overlays/multi-node", _unhashed_configmap_name, "ConfigMap 'qa-finetune-settings' is not rendered"),
    (check_pytorchjobs, "overlays/multi-node", _pytorchjob_field_typo, "elasticPolicy.nProcPerNod: unknown field"),
    (check_pytorchjobs, "overlays/multi-node", _pytorchjob_pod_field_typo, "imagePullPolicyy: unknown field"),
    (check_pytorchjobs, "overlays/multi-node", _pytorchjob_wrong_type, "minReplicas: '2' reads as 2"),
    (check_pytorchjobs, "overlays/multi-node", _elastic_world_size, "minReplicas, maxReplicas and Worker replicas differ"),
    (check_indexed_jobs, "predict", _shards_not_completions, "completions 4 but QA_PREDICT_SHARDS 2"),
    (check_indexed_jobs, "predict", _not_indexed, "completionMode 'NonIndexed', want Indexed"),
    (check_indexed_jobs, "predict", _one_failed_shard_tolerated, "maxFailedIndexes 0"),
    (check_qa_variables, "predict", _training_setting_for_predictions, "QA_EPOCHS: not a setting"),
    (check_settings_load, "predict", _training_setting_for_predictions, "a setting of the training job"),
    (check_resources, "predict", _cuda_without_a_gpu, "QA_DEVICE=cuda on a pod without an nvidia.com/gpu limit"),
    (check_grace, "predict", _predict_grace_too_short, "terminationGracePeriodSeconds 60 <= QA_STOP_GRACE_SECONDS 60"),
]


def test_every_check_has_a_breakage():
    assert {c.__name__ for c in CHECKS} == {c.__name__ for c, *_ in BREAKAGES}


@pytest.mark.parametrize(
    "check, kustomization, breakage, reason", BREAKAGES,
    ids=[f"{c.__name__}-{b.__name__}" for c, _, b, _ in BREAKAGES],
)
def test_check_catches(rendered, check, kustomization, breakage, reason):
    docs = copy.deepcopy(rendered[kustomization])
    assert not any(reason in p for p in check(docs))
    breakage(docs)
    problems = check(docs)
    assert any(reason in p for p in problems), problems


def _job_field_typo(docs):
    _main(docs, "Job")[1]["spec"]["restartPolicyy"] = "Never"


def _job_wrong_type(docs):
    _main(docs, "Job")[0]["spec"]["backoffLimit"] = "6"


def _job_api_version_typo(docs):
    _main(docs, "Job")[0]["apiVersion"] = "batch/v2"


def _field_newer_than_oldest_claim(docs):
    # pod-level resources exist from Kubernetes 1.32: fine for 1.37, unknown to 1.30
    _main(docs, "Job")[1]["spec"]["resources"] = {"limits": {"cpu": "8"}}


@pytest.mark.parametrize(
    "breakage, reason",
    [
        (_job_field_typo, "Additional properties are not allowed ('restartPolicyy' was unexpected)"),
        (_job_wrong_type, "'6' is not of type 'integer'"),
        # the CLI only warns (exit 0) when it has no schema for an apiVersion
        (_job_api_version_typo, "job/qa-finetune: did not pass against Kubernetes 1.30"),
        (_field_newer_than_oldest_claim, "against version 1.30: spec.template.spec: Additional properties"),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_kubernetes_validate_catches(rendered, breakage, reason, tmp_path):
    docs = copy.deepcopy(rendered["base"])
    breakage(docs)
    problems = kubernetes_validate(docs, tmp_path)
    assert any(reason in p for p in problems), problems
