"""The Recipe: expert defaults, YAML round-trip, overrides, and errors that name field, value and expectation."""

from __future__ import annotations

import pytest

from gradwise.errors import ConfigError
from gradwise.recipe import Recipe, load_recipe, parse_assignment


def test_defaults_are_the_experts():
    r = Recipe()
    assert r.optim.name == "adamw" and r.optim.weight_decay > 0
    assert r.schedule.name == "warmup_cosine" and r.schedule.warmup == 0.05
    assert r.train.grad_clip == 1.0
    assert r.train.precision == "auto"


def test_every_field_is_documented():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Recipe.__mro__[1]):
                yield from walk(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field.description

    undocumented = [path for path, doc in walk(Recipe) if not doc]
    assert undocumented == []


def test_yaml_round_trip(tmp_path):
    r = Recipe().override({"optim.lr": 3e-4, "epochs": 7, "model.kwargs": {"hidden": [32, 16]}})
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    again = load_recipe(path)
    assert again == r
    assert again.optim.lr == 3e-4 and again.train.epochs == 7
    assert again.model.kwargs == {"hidden": [32, 16]}


def test_overrides_by_path_alias_and_section():
    r = Recipe().override(
        lr=0.01, batch_size=8, optim={"weight_decay": 0.0}, **{"schedule.name": "constant"}
    )
    assert (r.optim.lr, r.data.batch_size, r.optim.weight_decay, r.schedule.name) == (
        0.01,
        8,
        0.0,
        "constant",
    )
    assert r.optim.name == "adamw"  # merging a section dict keeps its other fields


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr", "did you mean 'lr'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"optim": {"lr": -1}}, "optim.lr", "greater than 0"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "integer"),
        ({"optim": {"name": "adamx"}}, "optim.name", "'adamw'"),
        ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas", "[0, 1)"),
    ],
)
def test_bad_recipes_name_field_value_and_expectation(data, field, fragment):
    with pytest.raises(ConfigError) as info:
        Recipe.parse(data)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: got ")


def test_unknown_override_suggests_a_field():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        Recipe().override(lrr=1.0)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        Recipe().override({"train.epoch": 3})


def test_ambiguous_bare_names_are_not_aliases():
    with pytest.raises(ConfigError):  # 'kwargs' exists in model and data
        Recipe().override(kwargs={})


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_recipe("no/such/recipe.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_recipe(path)


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_assignment("model.kwargs.hidden=[8, 8]") == ("model.kwargs.hidden", [8, 8])
    assert parse_assignment("train.grad_clip=null") == ("train.grad_clip", None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("epochs")


def test_flat_keys():
    flat = Recipe().flat()
    assert flat["optim.lr"] == 1e-3 and flat["train.epochs"] == 20


def test_doctor_mode_off_unquoted_means_off():
    # YAML 1.1 reads an unquoted off as false: a user writing `mode: off` means the doctor off
    recipe = Recipe.from_yaml("doctor: {mode: off}\n")
    assert recipe.doctor.mode == "off"
    assert load_recipe({"doctor": {"mode": "off"}}).doctor.mode == "off"
    assert parse_assignment("doctor.mode=off")[1] is False  # the CLI's --set reads YAML too
    assert Recipe().override({"doctor.mode": False}).doctor.mode == "off"
    with pytest.raises(ConfigError, match=r"doctor\.mode"):
        Recipe.from_yaml("doctor: {mode: on}\n")  # on is not a mode: say so
