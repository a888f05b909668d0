"""The model card names the base model by its hub id, never by a path on the training machine."""
import json

from job.observe.model_card import base_model
from tests.support.tiny import MINILM


def test_a_hub_id_is_the_base_model():
    assert base_model("distilbert-base-uncased")[0] == "distilbert-base-uncased"
    assert base_model("org/some-model")[0] == "org/some-model"


def test_a_folder_in_the_hub_cache_is_that_hub_model(tmp_path):
    folder = tmp_path / "hub" / "models--distilbert--distilbert-base-uncased" / "snapshots" / "abc123"
    folder.mkdir(parents=True)
    assert base_model(str(folder)) == ("distilbert/distilbert-base-uncased", "`distilbert/distilbert-base-uncased`")


def test_another_folder_is_a_local_model_without_its_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "/home/me/old-run"}))
    hub_id, prose = base_model(str(tmp_path))
    assert hub_id is None and prose == "a local bert model (not a Hugging Face Hub id)"
    # the demo's MiniLM records the model it was fine-tuned from; it is mentioned, never claimed as the base
    hub_id, prose = base_model(str(MINILM))
    assert hub_id is None and "nreimers/MiniLM-L6-H384-uncased" in prose and str(MINILM) not in prose


def test_a_folder_whose_config_is_not_an_object_is_still_a_local_model(tmp_path):
    """The card is written after training: a config.json it cannot read must not end the run."""
    (tmp_path / "config.json").write_text("[1, 2]")
    assert base_model(str(tmp_path)) == (None, "a local model (not a Hugging Face Hub id)")
