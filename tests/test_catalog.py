"""The zoo's and data sets' arguments, and what user factories receive: docs/reference.md and the
``gradwise models`` / ``gradwise datasets`` commands, generated from the registries."""

from __future__ import annotations

from conftest import gradwise_main

from gradwise.catalog import MARKDOWN, datasets, models, render
from gradwise.data import DATASETS
from gradwise.models import MODELS
from gradwise.models.build import SIZE_ARGS


def test_docs_reference_md_is_generated_from_the_registries():
    assert MARKDOWN.read_text() == render(), "regenerate: python -m gradwise.catalog"


def test_every_model_and_data_set_is_listed_with_its_arguments():
    assert list(models()) == list(MODELS) and list(datasets()) == list(DATASETS)
    mlp = {a.name: a for a in models()["mlp"].arguments}
    assert mlp["in_features"].from_data and mlp["num_outputs"].from_data
    assert mlp["hidden"].default == "(256, 256)" and not mlp["hidden"].from_data
    digits = {a.name: a for a in datasets()["digits"].arguments}
    assert digits["flatten"].default == "False" and digits["flatten"].annotation == "bool"


def test_cli_models_and_datasets(monkeypatch, capsys):
    # the CLI's entry point in this process: three subprocesses would import torch three times
    code, out, _ = gradwise_main(monkeypatch, capsys, "models")
    assert code == 0 and all(name in out for name in MODELS)
    assert all(arg in out for arg in SIZE_ARGS)  # what your own factory receives
    code, out, _ = gradwise_main(monkeypatch, capsys, "datasets", "csv")
    assert code == 0 and "target: str (required)" in out
    assert "standardize: bool (default True)" in out
    code, _, err = gradwise_main(monkeypatch, capsys, "models", "mpl")
    assert code == 2 and "did you mean 'mlp'" in err and "Traceback" not in err
