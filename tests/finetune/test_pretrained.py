"""Loading pretrained weights: gradwise runs, state-dict files and Hugging Face directories, with a
report of every key, and nothing changed in the model but what was loaded."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import QUIET
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import gradwise as gw
from gradwise.checkpoint import WEIGHTS, save_checkpoint
from gradwise.errors import ConfigError, DataError, GradwiseWarning
from gradwise.finetune.pretrained import KeyReport, load_pretrained
from gradwise.models.mlp import mlp


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_only_loaded_changed(
    model: nn.Module, before: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Every tensor in ``expected`` (model key -> the file's tensor) is bitwise the file's; every
    other tensor of the model is bitwise what it was before loading."""
    after = model.state_dict()
    assert set(expected) <= set(after)
    for key, value in after.items():
        want = expected.get(key, before[key])
        assert torch.equal(value, want), key


def zoo_mlp(classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(4, classes, hidden=[16], dropout=0.0)


# -- gradwise run directories -------------------------------------------------------------------


def test_a_run_directory_into_a_model_with_other_classes_starts_only_the_head_fresh():
    recipe = {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "data": {"name": "iris"}}
    run = gw.Trainer(recipe=recipe, epochs=1, doctor={"mode": "off"}, **QUIET).fit()
    trained = load_file(run.best_checkpoint / WEIGHTS)

    model = zoo_mlp(classes=5, seed=1)  # iris has 3 classes; the new task 5
    before = snapshot(model)
    report = load_pretrained(model, run.dir)

    head = "5"  # Flatten, Linear, LayerNorm, GELU, Dropout, Linear: the last Linear is the head
    assert report.kind == "run" and report.source == str(run.dir)
    assert report.new_modules == [head]
    assert report.mismatched == [
        (f"{head}.weight", (5, 16), (3, 16)),
        (f"{head}.bias", (5,), (3,)),
    ]
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(k for k in trained if not k.startswith(head + "."))
    assert report.total == len(model.state_dict())
    # everything but the head is the checkpoint's, bitwise; the head is its fresh init
    assert_only_loaded_changed(model, before, {k: trained[k] for k in report.loaded})
    assert not torch.equal(before["1.weight"], trained["1.weight"])  # something really loaded

    step = run.best_checkpoint.name.removeprefix("step-").lstrip("0")
    lines = report.lines()
    assert lines[0] == f"loaded 4/6 tensors from {run.dir} (best checkpoint step {step})"
    assert f"new head: {head} (3 -> 5 outputs; its weights start fresh)" in lines
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["mismatched"][0] == [f"{head}.weight", [5, 16], [3, 16]]
    assert as_json["new_modules"] == [head] and as_json["kind"] == "run"


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path):
    old, new = zoo_mlp(3, seed=2), zoo_mlp(3, seed=3)
    save_checkpoint(tmp_path, 1, model=old, state={})
    damaged = save_checkpoint(tmp_path, 2, model=new, state={})
    data = bytearray((damaged / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: only the manifest's SHA-256 sees it
    (damaged / WEIGHTS).write_bytes(bytes(data))

    model = zoo_mlp(3, seed=4)
    before = snapshot(model)
    with pytest.warns(GradwiseWarning, match="step-00000002"):
        report = load_pretrained(model, tmp_path, which="last")
    assert report.detail == "latest checkpoint step 1"
    assert len(report.loaded) == report.total == 6
    assert_only_loaded_changed(model, before, old.state_dict())


# -- state-dict files ---------------------------------------------------------------------------


def test_a_safetensors_file_loads_exactly_into_a_compiled_model(tmp_path):
    source = zoo_mlp(3, seed=5)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = torch.compile(zoo_mlp(3, seed=6))  # keys "_orig_mod.1.weight", ...
    before = snapshot(model)
    report = load_pretrained(model, tmp_path / "weights.safetensors", strict=True)
    assert report.kind == "file" and report.missing == report.unexpected == []
    assert len(report.loaded) == 6 and "_orig_mod" in report.renamed
    expected = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    assert_only_loaded_changed(model, before, expected)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_a_lightning_style_torch_file_is_unwrapped_and_its_prefix_removed(tmp_path, wrapper):
    source = zoo_mlp(3, seed=7)
    # Lightning saves {"state_dict": {"model.<key>": ...}, "epoch": ..., ...} for self.model
    payload = {
        wrapper: {f"model.{k}": v for k, v in source.state_dict().items()},
        "epoch": 3,
        "global_step": 120,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}],
    }
    torch.save(payload, tmp_path / "last.pt")
    model = zoo_mlp(5, seed=8)
    before = snapshot(model)
    report = load_pretrained(model, tmp_path / "last.pt")
    assert report.renamed == "'model.' removed from the checkpoint's keys"
    assert report.new_modules == ["5"] and report.unexpected == []
    assert [k for k, _, _ in report.mismatched] == ["5.weight", "5.bias"]
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("5.")}
    assert_only_loaded_changed(model, before, expected)
    assert "key names: 'model.' removed from the checkpoint's keys" in report.lines()


def test_ddp_prefix_and_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    torch.manual_seed(9)
    source = Tied()
    save_model(source, str(tmp_path / "tied.safetensors"))  # stores the shared tensor once
    stored = load_file(tmp_path / "tied.safetensors")
    assert len(stored) == 3
    save_file({f"module.{k}": v for k, v in stored.items()}, tmp_path / "ddp.safetensors")

    torch.manual_seed(10)
    model = Tied()
    before = snapshot(model)
    report = load_pretrained(model, tmp_path / "ddp.safetensors", strict=True)
    assert report.renamed == "'module.' removed from the checkpoint's keys"
    assert sorted(report.loaded) == sorted(model.state_dict()) and report.missing == []
    assert_only_loaded_changed(model, before, source.state_dict())
    assert model.out.weight is model.embed.weight  # still tied


# -- Hugging Face directories ---------------------------------------------------------------------


def bert_config(**kwargs: object):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **kwargs,
    )


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_a_hugging_face_base_model_into_a_classifier(tmp_path, layout):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(11)
    base = BertModel(bert_config())
    directory = tmp_path / "bert"
    if layout == "bin":  # pytorch_model.bin: what older save_pretrained wrote
        directory.mkdir()
        base.config.save_pretrained(directory)
        torch.save(base.state_dict(), directory / "pytorch_model.bin")
    else:
        base.save_pretrained(directory, max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()

    torch.manual_seed(12)
    model = BertForSequenceClassification(bert_config(num_labels=4))
    before = snapshot(model)
    report = load_pretrained(model, directory)

    assert report.kind == "huggingface"
    assert report.renamed == "'bert.' added to the checkpoint's keys"
    assert report.new_modules == ["classifier"]
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == [] and report.mismatched == []
    expected = {f"bert.{k}": v for k, v in base.state_dict().items()}
    assert_only_loaded_changed(model, before, expected)
    lines = report.lines()
    assert lines[0].startswith(f"loaded {len(expected)}/{len(expected) + 2} tensors from")
    # config.json names the architecture when save_pretrained wrote it
    assert ("Hugging Face BertModel" if layout != "bin" else "Hugging Face bert") in lines[0]
    assert "new head: classifier (not in the checkpoint; its weights start fresh)" in lines


def test_a_fine_tuned_classifier_into_its_base_model_drops_the_head(tmp_path):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(13)
    classifier = BertForSequenceClassification(bert_config(num_labels=3))
    classifier.save_pretrained(tmp_path / "clf")
    model = BertModel(bert_config())
    before = snapshot(model)
    report = load_pretrained(model, tmp_path / "clf")
    assert report.renamed == "'bert.' removed from the checkpoint's keys"
    assert report.unexpected == ["classifier.bias", "classifier.weight"]  # the file's order
    assert report.missing == [] and report.new_modules == []
    expected = {k.removeprefix("bert."): v for k, v in classifier.state_dict().items()}
    assert_only_loaded_changed(model, before, {k: v for k, v in expected.items() if k in before})
    with pytest.raises(ConfigError, match=r"not in the model: classifier\.\w+, classifier\.\w+"):
        load_pretrained(BertModel(bert_config()), tmp_path / "clf", strict=True)


# -- strictness and errors ----------------------------------------------------------------------


def test_strict_names_the_keys_and_leaves_the_model_untouched(tmp_path):
    save_file(zoo_mlp(3, seed=14).state_dict(), tmp_path / "w.safetensors")
    model = zoo_mlp(5, seed=15)
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        load_pretrained(model, tmp_path / "w.safetensors", strict=True)
    message = str(info.value)
    assert info.value.field == "finetune.pretrained"
    assert "5.weight (5, 16) vs (3, 16)" in message and "5.bias (5) vs (3)" in message
    assert "finetune.strict: false" in message
    assert_only_loaded_changed(model, before, {})


def test_weights_that_match_nothing_raise_and_leave_the_model_untouched(tmp_path):
    torch.manual_seed(16)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    save_file(
        {f"encoder.{k}": v for k, v in other.state_dict().items()}, tmp_path / "o.safetensors"
    )
    model = zoo_mlp(3, seed=17)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="none of its 4 tensors matches one of the model's 6"):
        load_pretrained(model, tmp_path / "o.safetensors")
    # names that match with other shapes everywhere load nothing either
    save_file(mlp(7, 2, hidden=[9]).state_dict(), tmp_path / "shapes.safetensors")
    with pytest.raises(ConfigError, match="every tensor with a matching name has another shape"):
        load_pretrained(model, tmp_path / "shapes.safetensors")
    assert_only_loaded_changed(model, before, {})


def test_damaged_files_give_a_clear_error(tmp_path):
    model = zoo_mlp(3, seed=18)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match=rf"finetune.pretrained: cannot read {garbage}: not a"):
        load_pretrained(model, garbage)

    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"finetune.pretrained: cannot read {truncated}"):
        load_pretrained(model, truncated)
    flipped = bytearray(data)
    offset = data.index(b"data/0") + 200  # inside the first tensor's bytes
    flipped[offset] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="does not match its CRC"):
        load_pretrained(model, damaged)

    # hyper-parameters as an argparse.Namespace, as older Lightning checkpoints hold them
    hparams = argparse.Namespace(lr=0.1)
    torch.save({"state_dict": model.state_dict(), "hparams": hparams}, tmp_path / "pickled.pt")
    with pytest.raises(DataError, match=r"Python objects \(argparse\.Namespace\).*never unpickles"):
        load_pretrained(model, tmp_path / "pickled.pt")


def test_paths_that_are_no_weights_name_the_field(tmp_path):
    model = zoo_mlp(3, seed=19)
    with pytest.raises(
        ConfigError, match=r"finetune\.pretrained: got .*missing\.pt.*does not exist"
    ):
        load_pretrained(model, tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without checkpoints/ nor Hugging Face weights"):
        load_pretrained(model, tmp_path / "empty")
    (tmp_path / "w.npy").write_bytes(b"")
    with pytest.raises(ConfigError, match="suffix is not one of"):
        load_pretrained(model, tmp_path / "w.npy")
    with pytest.raises(ConfigError, match=r"finetune\.which"):
        load_pretrained(model, tmp_path, which="first")


def test_the_summary_abbreviates_long_lists():
    report = KeyReport(
        source="w.pt",
        kind="file",
        loaded=["a.weight"],
        missing=[f"m{i}" for i in range(3)],
        unexpected=[f"u{i}" for i in range(12)],
        total=4,
    )
    lines = report.lines()
    assert lines[0] == "loaded 1/4 tensors from w.pt"
    assert "missing (start fresh): m0, m1, m2" in lines
    assert "unexpected (ignored): u0, u1, u2, u3, u4 and 7 more" in lines


def test_a_gradwise_checkpoint_named_directly(tmp_path):
    source = zoo_mlp(3, seed=20)
    checkpoint = save_checkpoint(tmp_path / "run", 7, model=source, state={})
    model = zoo_mlp(3, seed=21)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good checkpoint: no fallback, no warning
        report = load_pretrained(model, Path(checkpoint))
    assert report.kind == "run" and report.detail == "checkpoint step-00000007"
    assert_only_loaded_changed(model, before, source.state_dict())
