"""Parameter-efficient fine-tuning through Hugging Face peft: real peft, real transformers models
built offline from small configs, real checkpoints and exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET, gradwise_main
from torch import nn
from torch.optim.swa_utils import AveragedModel

import gradwise as gw
from gradwise import checkpoint as ckpt
from gradwise.errors import ConfigError, DataError
from gradwise.finetune import adapters
from gradwise.finetune.adapters import (
    MergeError,
    apply_peft,
    base_of,
    is_peft,
    load_adapter,
    merged,
    save_adapter,
    trainable_counts,
)
from gradwise.recipe import FinetuneSpec, load_recipe

adapters._peft()
transformers = pytest.importorskip("transformers")


def net(seed: int = 0, width: int = 16) -> nn.Module:
    """Two hidden layers and a head ("4"): Linear(8, w), Linear(w, w), Linear(w, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def causal_lm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tokens(n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model: nn.Module, sample) -> torch.Tensor:
    """The logits for a tensor or a mapping of keyword inputs."""
    out = model(**sample) if isinstance(sample, dict) else model(sample)
    return out if isinstance(out, torch.Tensor) else out.logits


def nudge(model: nn.Module, scale: float = 0.2) -> None:
    """Move every trainable tensor (a freshly initialised LoRA B is zero: merging it is trivial)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_importing_peft_prints_nothing():
    code = "import gradwise.finetune.adapters as a; a._peft(); import peft; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n" and done.stderr == ""


def test_trainable_counts_are_peft_own_on_an_mlp_and_bert():
    model = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=4), head=["4"])
    assert is_peft(model) and not is_peft(net())
    assert trainable_counts(model) == model.get_nb_trainable_parameters()
    # LoRA A (4 x in) and B (out x 4) on both hidden layers, the head (16 x 3 + 3) in full
    lora = (4 * 8 + 16 * 4) + (4 * 16 + 16 * 4)
    assert trainable_counts(model)[0] == lora + 16 * 3 + 3
    classifier = apply_peft(bert(), FinetuneSpec(peft="lora", lora_r=2))
    trainable, total = trainable_counts(classifier)
    assert (trainable, total) == classifier.get_nb_trainable_parameters()
    assert 0 < trainable < total / 10
    saved = classifier.peft_config["default"].modules_to_save
    assert "classifier" in saved and "bert.pooler.dense" in saved  # the head group trains in full


def test_lora_trains_only_the_adapter_and_the_head(blobs):
    x, y = blobs
    model = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    base = {k for k in before if ".base_layer." in k or ".original_module." in k}
    assert base and not (moved & base)  # the frozen base is bitwise as it was
    assert any(".lora_B." in k for k in moved)
    assert any(".modules_to_save." in k for k in moved)  # the head trained in full
    assert moved == {k for k, p in model.named_parameters() if p.requires_grad}


def test_adapter_only_checkpoints_round_trip_exactly_and_are_small(tmp_path, blobs):
    x, _ = blobs
    model = apply_peft(net(width=256), FinetuneSpec(peft="lora", lora_r=4))
    nudge(model)
    ema = AveragedModel(model, use_buffers=True)
    ema.update_parameters(model)
    full = ckpt.save_checkpoint(tmp_path / "full", 1, model=net(width=256), state={})
    saved = ckpt.save_checkpoint(tmp_path / "peft", 1, model=model, state={"x": 1}, ema=ema)
    ratio = (saved / ckpt.WEIGHTS).stat().st_size / (full / ckpt.WEIGHTS).stat().st_size
    assert ratio < 0.15, ratio
    info = ckpt.adapter_info(saved / ckpt.WEIGHTS)
    assert info["peft"]["method"] == "lora" and len(info["base_sha256"]) == 64
    assert ckpt.adapter_info(full / ckpt.WEIGHTS) is None
    assert json.loads((saved / ckpt.META).read_text())["weights"] == "adapter"
    assert ckpt.verify_checkpoint(saved) == ""  # the manifest covers the adapter files

    again = adapters.prepare_for_load(net(width=256), FinetuneSpec(peft="lora", lora_r=4))
    ema_again = AveragedModel(again, use_buffers=True)
    state = ckpt.load_checkpoint(saved, again, ema=ema_again)
    assert state["x"] == 1
    for mine, theirs in ((model, again), (ema, ema_again)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(model(x), again(x))


def test_an_adapter_over_another_base_is_refused(tmp_path):
    model = apply_peft(net(seed=0), FinetuneSpec(peft="lora"))
    saved = ckpt.save_checkpoint(tmp_path, 1, model=model, state={})
    other = apply_peft(net(seed=1), FinetuneSpec(peft="lora"))
    with pytest.raises(DataError, match=r"lora adapter, trained over another base model"):
        ckpt.load_checkpoint(saved, other)
    with pytest.raises(DataError, match=r"finetune\.peft"):  # the base without its adapter
        ckpt.load_checkpoint(saved, net(seed=0))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merging_keeps_the_outputs_on_an_mlp_and_bert(method, blobs):
    x, _ = blobs
    for build, sample in ((net, x), (bert, tokens())):
        model = apply_peft(build(), FinetuneSpec(peft=method, lora_r=4))
        kind = type(model.get_base_model())
        nudge(model)
        plain = merged(model, sample)
        assert type(plain) is kind and not is_peft(plain)
        model.eval(), plain.eval()
        with torch.no_grad():
            ours, theirs, base = run(model, sample), run(plain, sample), run(base_of(model), sample)
        assert (ours - theirs).abs().max() <= 1e-5
        assert (ours - base).abs().max() > 1e-3  # the adapter does change the model
        assert is_peft(model)  # merged works on a copy


def test_a_merge_beyond_the_tolerance_raises_naming_the_difference(blobs):
    model = apply_peft(net(), FinetuneSpec(peft="dora", lora_r=4))
    nudge(model, 2.0)
    with pytest.raises(MergeError, match=r"max abs difference .* > tolerance 1e-30"):
        merged(model, blobs[0], tolerance=1e-30)


def test_ia3_on_an_mlp_scales_and_trains(blobs):
    x, y = blobs
    model = apply_peft(net(), FinetuneSpec(peft="ia3"))
    scales = {n: p.shape for n, p in model.named_parameters() if "ia3_l" in n}
    # a plain stack is all feed-forward: (IA)^3 scales each adapted layer's input
    assert set(scales.values()) == {torch.Size([1, 8]), torch.Size([1, 16])}
    assert (
        trainable_counts(model)
        == model.get_nb_trainable_parameters()
        == (8 + 16 + 51, 467 + 51 + 8 + 16)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = None
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    nudge(model, 0.5)
    assert (merged(model, x)(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # transformers, to peft
@pytest.mark.parametrize(("method", "kind"), [("prefix", "llama"), ("prompt", "gpt2")])
def test_prefix_and_prompt_tuning_wrap_a_causal_lm(method, kind):
    model = apply_peft(
        causal_lm(kind), FinetuneSpec(peft=method, virtual_tokens=4, modules_to_save=[])
    )
    batch = tokens(2, 6)
    out = model(**batch, labels=batch["input_ids"])
    extra = 4 if method == "prompt" else 0  # prompt tuning's virtual tokens come back as logits
    assert out.logits.shape == (2, 6 + extra, 100) and out.loss.isfinite()
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("prompt_encoder.") for n in grads)
    # prefix: keys and values for each of 2 layers, 32 wide; prompt: one embedding per token
    expected = 4 * 2 * 2 * 32 if method == "prefix" else 4 * 32
    assert trainable_counts(model) == model.get_nb_trainable_parameters()
    assert trainable_counts(model)[0] == expected
    with pytest.raises(ConfigError, match=r"merge=False"):
        merged(model, batch)


def test_prefix_tuning_needs_a_transformers_model():
    with pytest.raises(ConfigError, match=r"finetune\.peft: got 'prefix'.*plain torch module"):
        apply_peft(net(), FinetuneSpec(peft="prefix"))


def test_several_adapters_over_one_base(tmp_path, blobs):
    x, _ = blobs
    model = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=4, adapter="first"))
    base = {k: v.clone() for k, v in base_of(model).state_dict().items()}
    nudge(model)
    model.eval()
    first = model(x).detach()
    directory = save_adapter(model, tmp_path / "first")
    assert {p.name for p in directory.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # peft reads gradwise's adapter directory on its own
    import peft

    theirs = peft.PeftModel.from_pretrained(net(), str(directory)).eval()
    assert torch.equal(theirs(x), first)

    second = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=2, adapter="second"))
    nudge(second, 0.5)
    save_adapter(second, tmp_path / "second")
    model = load_adapter(model, tmp_path / "second", "second")
    model.set_adapter("second")
    other = model(x).detach()
    assert (other - first).abs().max() > 1e-3
    assert torch.equal(other, second.eval()(x))
    model.set_adapter("first")
    assert torch.equal(model(x), first)  # switching back is exact
    now = base_of(model).state_dict()
    assert all(torch.equal(base[k], now[k]) for k in base)  # one untouched base
    with pytest.raises(DataError, match=r"no adapter_config\.json"):
        load_adapter(model, tmp_path, "third")
    alone = load_adapter(net(), tmp_path / "first", "first")  # a plain base gets wrapped
    assert torch.equal(alone.eval()(x), first)


def test_adapter_state_moves_an_adapter_between_models(blobs):
    x, _ = blobs
    model = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=4))
    nudge(model)
    state = adapters.adapter_state(model)
    assert "base_model.model.0.lora_A.weight" in state and "base_model.model.4.weight" in state
    assert not any(".default." in k or "base_layer" in k for k in state)
    fresh = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=4))
    adapters.load_adapter_state(fresh, state)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    with pytest.raises(DataError, match=r"missing \['base_model\.model\.0\.lora_A"):
        adapters.load_adapter_state(fresh, {k: v for k, v in state.items() if ".0.lora_A" not in k})
    with pytest.raises(DataError, match=r"does not fit"):
        wider = apply_peft(net(), FinetuneSpec(peft="lora", lora_r=2))
        adapters.load_adapter_state(wider, state)


def test_target_modules_by_name_regex_and_type():
    def targets(**settings) -> list[str]:
        model = apply_peft(net(), FinetuneSpec(peft="lora", **settings))
        return sorted(n.split(".")[2] for n, _ in model.named_parameters() if ".lora_A." in n)

    assert targets() == ["0", "2"]  # every Linear but the head ("4")
    assert targets(target_modules=["2"]) == ["2"]
    assert targets(target_modules=r"[02]") == ["0", "2"]
    assert targets(target_modules=["Linear"], modules_to_save=[]) == ["0", "2", "4"]
    with pytest.raises(ConfigError, match=r"finetune\.target_modules"):
        apply_peft(net(), FinetuneSpec(peft="lora", target_modules=["encoder"]))
    deep = nn.Sequential(*(nn.Linear(4, 4) for _ in range(13)))
    with pytest.raises(ConfigError, match=r"finetune\.modules_to_save.*also train \['12'\]"):
        apply_peft(deep, FinetuneSpec(peft="lora", modules_to_save=["2"]))
    assert not is_peft(deep)  # refused before anything was wrapped
    gpt = gw.build_model("gpt", {"vocab_size": 50, "d_model": 16, "n_heads": 2, "n_layers": 2})
    model = apply_peft(gpt, FinetuneSpec(peft="lora"))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "base_model.model.head" not in adapted  # the LM head is tied to the embedding
    assert len(adapted) == 8  # per block: qkv, attention proj, mlp fc, mlp proj


def test_a_peft_run_resumes_exactly_and_exports_merged_or_beside_its_base(
    tmp_path, monkeypatch, capsys
):
    plain = {**QUIET, "doctor": {"mode": "off"}}
    iris = {"model": {"name": "mlp"}, "data": {"name": "iris"}}
    base = gw.Trainer(recipe={**iris, "train": {"epochs": 1}}, name="base", **plain).fit()
    recipe = {
        **iris,
        "train": {"epochs": 4, "ema_decay": 0.9},
        "finetune": {"pretrained": str(base.dir), "peft": "lora", "lora_r": 4},
    }
    whole = gw.Trainer(recipe=recipe, name="whole", **plain).fit()
    halfway = gw.Trainer(
        recipe=recipe, name="half", on_evaluate=lambda e: e["epoch"] == 2, **plain
    ).fit()
    assert halfway.state == "stopped"
    resumed = gw.Trainer.resume(halfway.dir, progress="off").fit()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = ckpt.list_checkpoints(whole.dir)[-1]
    for name in (ckpt.WEIGHTS, ckpt.EMA_WEIGHTS):
        assert ckpt.adapter_info(last / name)["peft"]["method"] == "lora"
    with pytest.raises(gw.ConfigError, match="this run trained an adapter"):
        gw.load_pretrained(gw.build_model("mlp", whole.recipe.model.kwargs), str(whole.dir))

    from gradwise.deploy.card import load_card
    from gradwise.deploy.export import export

    artifact = export(whole.dir, out=tmp_path / "merged")
    assert artifact.card["peft"]["merged"] and artifact.card["peft"]["max_abs"] <= 1e-5
    assert artifact.parity["passed"] and artifact.card["source"]["weights"] == "ema"
    code, out, err = gradwise_main(
        monkeypatch, capsys, "export", str(whole.dir), "--no-merge", "--out", "beside"
    )
    assert code == 0, err
    assert "the exported model is the base without the lora adapter" in out
    beside = SimpleNamespace(dir=Path("beside"), card=load_card("beside"))
    entry = beside.card["peft"]
    assert not entry["merged"] and beside.card["parity"]["passed"]
    assert [f["name"] for f in entry["files"]] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    load_card(beside.dir)  # every file it names matches its sha256
    import onnxruntime
    import peft

    recorded = load_recipe(whole.dir / "recipe.yaml")  # the same base, pretrained, + the adapter
    rebuilt = gw.build_model("mlp", recorded.model.kwargs)
    gw.load_pretrained(rebuilt, str(base.dir))
    tuned = peft.PeftModel.from_pretrained(rebuilt, str(beside.dir)).eval()
    x = torch.randn(5, 4)
    session = onnxruntime.InferenceSession(str(artifact.path))
    onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(tuned(x).detach().numpy() - onnx).max() <= 1e-4  # the merged export
    (beside.dir / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(gw.GradwiseError, match=r"does not match the sha256"):
        load_card(beside.dir)
