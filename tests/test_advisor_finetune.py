"""The advisor for fine-tuning: facts measured on real pretrained-style models (Hugging Face BERT
built offline, peft adapters, frozen parts), and each fine-tuning rule's value and reason."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import gradwise as gw
from gradwise.advisor import Advice, decide, respect
from gradwise.facts import Facts, facts
from gradwise.finetune import layer_groups, prepare
from gradwise.recipe import FinetuneSpec, Recipe

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bert(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _tokens(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (n, 16), generator=g), torch.randint(0, 2, (n,), generator=g)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A "pretrained" BERT's weights in a safetensors file (finetune.pretrained)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("pretrained") / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in _bert().state_dict().items()}, str(path))
    return str(path)


def _advice(f: Facts, epochs: int | None = None) -> dict[str, Advice]:
    return {a.setting: a for a in decide(f, epochs)}


def _prepared(spec: FinetuneSpec, hidden: int = 32) -> Facts:
    """Facts as the assembly measures them: after prepare() froze, wrapped or scheduled."""
    done = prepare(_bert(hidden), spec)
    return facts(done.model, _tokens(), finetune=spec)


# ---------------------------------------------------------------------------- facts


def test_facts_tell_scratch_full_partial_and_peft_apart():
    data = _tokens()
    scratch = facts(_bert(), data)
    assert (scratch.finetune, scratch.peft, scratch.adapter_params) == ("scratch", None, 0)
    assert facts(_bert(), data, finetune=FinetuneSpec()).finetune == "scratch"  # inactive

    model = _bert()
    full = facts(model, data, finetune=FinetuneSpec(pretrained="runs/base"))
    assert full.finetune == "full" and full.trainable_params == full.params
    assert full.layer_groups == len(layer_groups(model)) == 4  # stem, 2 blocks, head

    head_only = _prepared(FinetuneSpec(freeze=["bert.embeddings", "bert.encoder"]))
    assert head_only.finetune == "partial" and head_only.head_only  # the pooler and classifier
    assert head_only.trainable_params < head_only.params and head_only.unfreezing is None

    gradual = _prepared(FinetuneSpec(unfreeze_every=1, lr_range=(1e-5, 1e-4)))
    assert (gradual.finetune, gradual.unfreezing, gradual.lr_groups) == (
        "partial",
        "gradual",
        "lr_range",
    )
    assert not gradual.head_only  # everything trains later

    lora = _prepared(FinetuneSpec(peft="lora", lora_r=4))
    done = prepare(_bert(), FinetuneSpec(peft="lora", lora_r=4))
    adapter = sum(p.numel() for n, p in done.model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in done.model.parameters() if p.requires_grad)
    assert (lora.finetune, lora.peft, lora.peft_in_recipe) == ("peft", "lora", True)
    assert lora.adapter_params == adapter > 0 and lora.trainable_params == trainable
    assert lora.base_params == lora.params - adapter and lora.layer_groups is None


def test_facts_find_adapters_you_wrapped_yourself():
    data = _tokens()
    dora = peft.get_peft_model(
        _bert(), peft.LoraConfig(r=4, target_modules=["query"], use_dora=True)
    )
    f = facts(dora, data)  # no finetune section: the adapters are in the model
    assert (f.finetune, f.peft, f.peft_in_recipe) == ("peft", "dora", False)
    magnitudes = sum(p.numel() for n, p in dora.named_parameters() if "magnitude" in n)
    assert magnitudes > 0 and f.adapter_params > magnitudes

    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5)
    prompt = peft.get_peft_model(_bert(), config)
    f = facts(prompt, data)
    assert f.peft == "prompt" and f.adapter_params == 5 * 32  # the virtual tokens only


# ---------------------------------------------------------------------------- learning rates


def test_a_lora_model_no_longer_gets_the_from_scratch_rate():
    """The issue: gw.advise on a LoRA-wrapped model advised the from-scratch 5e-3."""
    data = _tokens()
    scratch = {a.setting: a for a in gw.advise(_bert(), data).advice}["optim.lr"]
    assert scratch.value >= 5e-3
    wrapped = peft.get_peft_model(_bert(), peft.LoraConfig(r=8, target_modules=["query", "value"]))
    advised = gw.advise(wrapped, data)
    lr = {a.setting: a for a in advised.advice}["optim.lr"]
    assert lr.value == 1e-3 < scratch.value / 5  # 5e-4 at width 768, x sqrt(768/32), capped
    assert "LoRA adapters with AdamW" in lr.why and "never the from-scratch" in lr.why
    assert any("Hu et al. 2021" in r for r in lr.references)
    # the model was wrapped in Python: the advisor adds no finetune section of its own
    assert advised.recipe.finetune.peft is None and not advised.recipe.finetune.active
    assert not any(a.setting.startswith("finetune.") for a in advised.advice)


def test_lora_rate_falls_with_width_and_other_methods_have_their_own():
    lora = _prepared(FinetuneSpec(peft="lora"))
    assert _advice(dataclasses.replace(lora, width=768))["optim.lr"].value == 5e-4  # Hu et al.
    assert _advice(dataclasses.replace(lora, width=4096))["optim.lr"].value == 2.2e-4  # QLoRA
    assert _advice(dataclasses.replace(lora, width=65536))["optim.lr"].value == 1e-4  # floor
    dora = _advice(dataclasses.replace(lora, peft="dora", width=768))["optim.lr"]
    assert dora.value == 5e-4 and any("DoRA" in r for r in dora.references)

    expected = {"ia3": (3e-3, "T-Few"), "prefix": (1e-2, "Li & Liang"), "prompt": (3e-2, "0.3")}
    for method, (value, cited) in expected.items():
        advice = _advice(dataclasses.replace(lora, peft=method))["optim.lr"]
        assert advice.value == value, method
        assert cited in advice.why + " ".join(advice.references), method


def test_full_fine_tuning_is_a_tenth_of_scratch_within_the_transformer_range():
    for hidden, spec in [(32, FinetuneSpec(pretrained="runs/base")), (256, None)]:
        model = _bert(hidden)
        scratch = _advice(facts(model, _tokens()), epochs=3)["optim.lr"].value  # same batch
        if spec is None:
            spec = FinetuneSpec(pretrained="runs/base")
        lr = _advice(facts(model, _tokens(), finetune=spec))["optim.lr"]
        tenth = float(f"{scratch / 10:.2g}")
        assert lr.value == min(max(tenth, 2e-5), 1e-4), hidden
        assert "a tenth of the from-scratch" in lr.why and lr.value < scratch / 5
        assert any("Devlin" in r for r in lr.references)
        assert any("Kornblith" in r for r in lr.references)

    torch.manual_seed(0)  # an MLP: a tenth exactly, no transformer range
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    data = (torch.randn(400, 8), torch.randint(0, 2, (400,)))
    scratch = _advice(facts(mlp, data))["optim.lr"].value
    lr = _advice(facts(mlp, data, finetune=FinetuneSpec(pretrained="w.safetensors")))["optim.lr"]
    assert lr.value == float(f"{scratch / 10:.2g}")


def test_head_only_training_keeps_the_from_scratch_rate():
    head_only = _prepared(FinetuneSpec(freeze=["bert.embeddings", "bert.encoder"]))
    scratch = _advice(facts(_bert(), _tokens()), epochs=3)["optim.lr"].value  # same batch
    lr = _advice(head_only)["optim.lr"]
    assert lr.value == scratch and "linear probing" in lr.why


# ---------------------------------------------------------------------------- the other settings


def test_epochs_warmup_and_weight_decay_for_fine_tuning(weights):
    full = _advice(_prepared(FinetuneSpec(pretrained=weights)))
    assert full["train.epochs"].value == 3 and "2-4 suffice" in full["train.epochs"].why
    assert full["schedule.warmup"].value == 0.06 and "RoBERTa" in full["schedule.warmup"].why
    assert full["optim.weight_decay"].value == 0.01 and "BERT" in full["optim.weight_decay"].why
    assert full["early_stopping.patience"].value is None  # 3 epochs: nothing to save

    kept = _advice(_prepared(FinetuneSpec(pretrained=weights)), epochs=7)
    assert kept["train.epochs"].value == 7  # a budget you gave is yours

    lora = _advice(_prepared(FinetuneSpec(peft="lora")))
    assert lora["optim.weight_decay"].value == 0.0 and "QLoRA" in lora["optim.weight_decay"].why
    assert lora["optim.name"].value == "adamw"

    prompt = _prepared(FinetuneSpec(peft="lora"))
    prompt = _advice(dataclasses.replace(prompt, peft="prompt"))
    assert prompt["train.epochs"].value == 50  # prompt tuning learns slowly: the data default

    gradual = _advice(_prepared(FinetuneSpec(unfreeze_every=1)))
    assert gradual["train.epochs"].value == 50  # an epoch per layer group at least


def test_target_modules_only_for_lora_the_user_chose_and_kept_when_given():
    advice = _advice(_prepared(FinetuneSpec(peft="lora")))["finetune.target_modules"]
    assert advice.value is None and "every Linear layer but the head" in advice.why
    assert any("Dettmers" in r for r in advice.references)

    chosen = _advice(_prepared(FinetuneSpec(peft="lora", target_modules=["query", "value"])))
    assert chosen["finetune.target_modules"].value == ["query", "value"]
    assert chosen["finetune.target_modules"].why.startswith("your choice, kept")

    ia3 = _prepared(FinetuneSpec(peft="lora"))
    assert "finetune.target_modules" not in _advice(dataclasses.replace(ia3, peft="prompt"))


def test_lora_rank_by_data_size_capped_by_width():
    lora = _prepared(FinetuneSpec(peft="lora"))
    wide = dataclasses.replace(lora, width=768)
    for n, rank in [(500, 4), (5_000, 8), (50_000, 16), (500_000, 32), (5_000_000, 64)]:
        advice = _advice(dataclasses.replace(wide, n_samples=n))["finetune.lora_r"]
        assert advice.value == rank and f"{n:,} training samples" in advice.why
    narrow = _advice(dataclasses.replace(lora, n_samples=50_000))["finetune.lora_r"]
    assert narrow.value == 8 and "a quarter of the width 32" in narrow.why


def test_peft_is_kept_with_a_note_where_full_fine_tuning_can_do_better():
    lora = _prepared(FinetuneSpec(peft="lora"))
    big = dataclasses.replace(lora, params=110_000_000 + lora.adapter_params)
    little = _advice(dataclasses.replace(big, n_samples=2_000))["finetune.peft"]
    assert little.value == "lora" and "little data for this model" in little.why
    lots = _advice(dataclasses.replace(big, n_samples=400_000))["finetune.peft"]  # 6.4M tokens
    assert lots.value == "lora"  # a note, never a switch
    assert "full fine-tuning (finetune.peft: null) can beat LoRA" in lots.why
    assert any("Biderman" in r for r in lots.references)
    prompt = _advice(dataclasses.replace(big, peft="prompt", n_samples=2_000))["finetune.peft"]
    assert prompt.value == "prompt" and "usually trails" in prompt.why


def test_lr_decay_for_gradual_unfreezing_keeps_ulmfits_spread(weights):
    gradual = _prepared(FinetuneSpec(unfreeze_every=1))
    advice = _advice(gradual)
    assert gradual.layer_groups == 4 and advice["finetune.lr_decay"].value == 2.6
    assert "ULMFiT" in advice["finetune.lr_decay"].why
    assert "top layer group's rate" in advice["optim.lr"].why
    deep = _advice(dataclasses.replace(gradual, layer_groups=14))["finetune.lr_decay"]
    assert deep.value == round(2.6 ** (4 / 13), 2) == 1.34
    assert math.isclose(deep.value**13, 2.6**4, rel_tol=0.03)  # the bottom at ~1/46 of the top
    ranged = _prepared(FinetuneSpec(unfreeze_every=1, lr_range=(1e-5, 1e-4)))
    assert "finetune.lr_decay" not in _advice(ranged)  # one of lr_decay and lr_range
    assert "finetune.lr_decay" not in _advice(_prepared(FinetuneSpec(pretrained=weights)))

    recipe = Recipe(finetune={"unfreeze_every": 1})  # the advice makes a valid recipe
    advised = recipe.override({s: a.value for s, a in advice.items()})
    assert advised.finetune.lr_decay == 2.6 and advised.optim.lr == advice["optim.lr"].value


def test_without_fine_tuning_the_advice_is_what_it_was():
    model, data = _bert(), _tokens()
    before = [a.to_dict() for a in decide(facts(model, data))]
    inactive = [a.to_dict() for a in decide(facts(model, data, finetune=FinetuneSpec()))]
    assert before == inactive
    assert not any(a["setting"].startswith("finetune.") for a in before)


def test_advice_on_the_finetune_section_never_contradicts_the_prepared_model():
    """The assembly prepares the model (adapter rank, layer groups) before the advice: a different
    finetune.* value is reported, not written into a recipe the model does not match."""
    spec = {"peft": "lora"}  # lora_r: the default 8
    recipe = Recipe(finetune=spec)
    advice = decide(_prepared(FinetuneSpec(**spec)))  # 300 samples: the advisor would pick 4
    rank = next(a for a in advice if a.setting == "finetune.lora_r")
    assert rank.value == 4
    kept = respect(rank, recipe, {"finetune.peft"})
    assert kept.value == 8 and kept.why.startswith("kept: the model was prepared with 8")
    assert "set finetune.lora_r: 4 to follow the advice" in kept.why
    mine = respect(rank, recipe, {"finetune.peft", "finetune.lora_r"})
    assert mine.value == 8 and mine.why.startswith("kept your setting")
    assert respect(rank, recipe, set(), prepared=()).value == 4  # for a caller that re-prepares
    lr = next(a for a in advice if a.setting == "optim.lr")
    assert respect(lr, recipe, set()) is lr  # training settings are applied as before
