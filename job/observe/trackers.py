"""Which trackers a run reports to: ``QA_REPORT_TO``, the Trainer's own integrations.

``tensorboard``, ``mlflow``, ``wandb``, ... Each is checked at start: an unknown name, or one whose
package is missing, is a configuration error, not a crash after the data is downloaded.
TensorBoard, the default, is checked without importing transformers (about 5 s), so a typo, a bad
row or a finished run is still reported within a second or two; any other name is checked
against the Trainer's own table of integrations.
"""
from __future__ import annotations

from importlib.util import find_spec

# pip names of the integrations whose package is not called like the integration
_PIP_NAMES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit", "tensorboard": "tensorboard"}


def tracker_problems(names) -> list[str]:
    """One message per tracker that cannot run here: not an integration of the Trainer, or its package missing."""
    problems = []
    others = [n for n in names if n != "tensorboard"]
    if len(others) < len(names) and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        # what the Trainer's TensorBoard integration imports (torch.utils.tensorboard needs the
        # tensorboard package), checked without importing transformers
        problems.append(_missing("tensorboard", "neither tensorboard nor tensorboardX is installed"))
    if not others:
        return problems
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in others:
        callback = INTEGRATION_TO_CALLBACK.get(name)
        if callback is None:
            problems.append(f"unknown tracker {name!r} (the Trainer knows {', '.join(sorted(INTEGRATION_TO_CALLBACK))}; or none)")
            continue
        try:
            callback()  # each integration's constructor checks that its package imports, and does nothing else
        except Exception as exc:  # noqa: BLE001  RuntimeError or ImportError, depending on the integration
            problems.append(_missing(name, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
    return problems


def _missing(name: str, why: str) -> str:
    pip = _PIP_NAMES.get(name, name)
    return f"{name} needs the Python package {pip!r}, which does not import here (pip install {pip}): {why}"


def trainer_integrations(trackers: tuple[str, ...]) -> list[str] | str:
    """``report_to`` for TrainingArguments: every tracker but TensorBoard, which ``RunTensorBoard`` runs."""
    return [t for t in trackers if t != "tensorboard"] or "none"
