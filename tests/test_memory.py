"""Activation checkpointing (gradwise.memory): the same gradients, state_dict keys and BatchNorm
statistics as without it, far fewer bytes kept for the backward pass, clear errors, and FSDP2."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

from gradwise.errors import ConfigError
from gradwise.memory import (
    FIELD,
    apply_activation_checkpointing,
    checkpointed,
    measure_activation_memory,
    recomputing,
    unwrap,
)
from gradwise.models.cnn import cnn
from gradwise.models.gpt import gpt
from gradwise.models.resnet import resnet
from gradwise.models.transformer import transformer

TOKENS = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _gpt(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return gpt(vocab_size=50, max_seq_len=16, d_model=32, n_heads=2, n_layers=3, dropout=dropout)


def _resnet(drop_path: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return resnet(3, 10, widths=(8, 16), blocks_per_stage=(1, 2), drop_path=drop_path)


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """One training forward and backward from a fixed random state: every parameter's gradient."""
    model.train()
    torch.manual_seed(seed)
    model(x).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt_with_dropout_gives_bitwise_equal_gradients():
    plain = _gpt(dropout=0.1)
    wrapped = copy.deepcopy(plain)
    names = apply_activation_checkpointing(wrapped, True)
    assert names == ["trunk.blocks.0", "trunk.blocks.1", "trunk.blocks.2"]
    expected = _grads(plain, TOKENS)
    assert _equal(expected, _grads(wrapped, TOKENS))  # bitwise: the replay redraws the same masks
    assert not _equal(expected, _grads(copy.deepcopy(plain), TOKENS, seed=2))  # dropout is live


def test_resnet_gradients_and_batchnorm_statistics_unchanged():
    plain = _resnet(drop_path=0.2)
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped, True) == ["blocks.0", "blocks.1", "blocks.2"]
    assert _equal(_grads(plain, IMAGES), _grads(wrapped, IMAGES))
    # the replay runs BatchNorm in training mode again; its running statistics are put back
    for (key, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert int(wrapped.blocks[0].bn1.num_batches_tracked) == 1


def test_state_dict_keys_unchanged_and_checkpoints_interchangeable():
    plain, wrapped = _gpt(), _gpt()
    apply_activation_checkpointing(wrapped, True)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert type(wrapped.trunk.blocks[0]) is type(plain.trunk.blocks[0])
    with torch.no_grad():  # weights the other model does not have, then load them across
        for p in wrapped.parameters():
            p.add_(0.01)
    plain.load_state_dict(wrapped.state_dict(), strict=True)
    fresh = _gpt()
    apply_activation_checkpointing(fresh, True)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    for m in (plain, wrapped, fresh):
        m.eval()
    assert torch.equal(plain(TOKENS), wrapped(TOKENS))
    assert torch.equal(fresh(TOKENS), wrapped(TOKENS))


def test_deep_copy_checkpoints_its_own_blocks_and_unwrap_restores():
    wrapped = _gpt()
    apply_activation_checkpointing(wrapped, True)
    twin = copy.deepcopy(wrapped)  # the EMA and the learning-rate finder copy the model
    assert checkpointed(twin) == checkpointed(wrapped)
    block = twin.trunk.blocks[0]
    assert block.forward.__self__ is block
    assert apply_activation_checkpointing(twin, True) == checkpointed(twin)  # nothing wrapped twice
    assert _equal(_grads(twin, TOKENS), _grads(_gpt(), TOKENS))
    assert all(p.grad is None for p in wrapped.parameters())  # the copy trained, not the original
    assert unwrap(twin) == checkpointed(wrapped) and checkpointed(twin) == []
    assert "forward" not in twin.trunk.blocks[0].__dict__


def test_names_and_globs_choose_the_outermost_modules():
    model = transformer(num_outputs=3, vocab_size=50, max_seq_len=16, d_model=32, n_heads=2)
    assert apply_activation_checkpointing(copy.deepcopy(model), ["MLP"]) == [
        "trunk.blocks.0.mlp",
        "trunk.blocks.1.mlp",
    ]
    # "*" crosses dots: trunk.blocks.0.attn matches too, but lies inside trunk.blocks.0
    assert apply_activation_checkpointing(copy.deepcopy(model), ["trunk.blocks.*"]) == [
        "trunk.blocks.0",
        "trunk.blocks.1",
    ]
    qualified = "gradwise.models.blocks.Attention"
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped, [qualified, "MLP"]) == [
        "trunk.blocks.0.attn",
        "trunk.blocks.0.mlp",
        "trunk.blocks.1.attn",
        "trunk.blocks.1.mlp",
    ]
    assert _equal(_grads(model, TOKENS), _grads(wrapped, TOKENS))
    assert apply_activation_checkpointing(copy.deepcopy(model), False) == []
    assert apply_activation_checkpointing(copy.deepcopy(model), []) == []


def test_unknown_type_name_is_a_config_error_listing_the_models_types():
    with pytest.raises(ConfigError) as error:
        apply_activation_checkpointing(_gpt(), ["Blok"])
    assert error.value.field == FIELD and error.value.value == "Blok"
    message = str(error.value)
    assert "did you mean 'Block'?" in message
    for kind in ("Block", "Attention", "MLP", "Linear"):
        assert kind in message
    assert "trunk.blocks.0" in message  # what a path glob would look like


def test_true_on_a_model_without_known_blocks_asks_for_a_list():
    torch.manual_seed(0)
    model = cnn(in_channels=3, num_outputs=10)
    with pytest.raises(ConfigError) as error:
        apply_activation_checkpointing(model, True)
    assert error.value.field == FIELD
    assert "list the module types" in str(error.value) and "Conv2d" in str(error.value)
    with pytest.raises(ConfigError, match=FIELD):
        apply_activation_checkpointing(model, "Block")  # a string, not a list


def test_no_checkpointing_without_gradients_and_replay_is_visible_to_hooks():
    model = _gpt()
    apply_activation_checkpointing(model, True)
    calls: list[bool] = []
    # a pre-hook: the replay stops as soon as it has recomputed what backward needs (early stop),
    # so a block's last post-hooks may not run a second time
    model.trunk.blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(recomputing()))
    model.eval()
    with torch.no_grad():
        model(TOKENS)
    assert calls == [False]
    calls.clear()
    _grads(model, TOKENS)
    assert calls == [False, True]  # the forward, then the replay in the backward pass
    assert not recomputing()


def test_saved_tensor_bytes_drop_on_the_zoo_gpt():
    torch.manual_seed(0)
    model = gpt(vocab_size=64, max_seq_len=64, d_model=64, n_heads=4, n_layers=4, dropout=0.1)
    x = torch.randint(0, 64, (8, 64))
    report = measure_activation_memory(model, lambda m: m(x).pow(2).mean())
    assert len(report["wrapped"]) == 4
    # measured: about 20x (the blocks keep only their input; logits and embeddings stay)
    assert report["saved_ratio"] > 5, report
    assert report["saved_mb_checkpointed"] < report["saved_mb"]
    assert report["peak_mb"] is None  # CUDA only
    assert all(p.grad is None for p in model.parameters()) and checkpointed(model) == []


def test_hugging_face_layers_recognised():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    plain = BertModel(config)
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped, True) == ["encoder.layer.0", "encoder.layer.1"]

    def grads(m: nn.Module) -> dict[str, torch.Tensor]:
        m.train()
        torch.manual_seed(3)
        m(input_ids=TOKENS).last_hidden_state.pow(2).mean().backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    expected = grads(plain)
    assert len(expected) > 10 and _equal(expected, grads(wrapped))


def _fsdp_worker(rank: int, store: str, results: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        base = gpt(vocab_size=50, max_seq_len=16, d_model=32, n_heads=2, n_layers=2, dropout=0.1)
        out = {}
        for ck in (False, True):
            model = copy.deepcopy(base)
            if ck:
                apply_activation_checkpointing(model, True)
            for block in model.trunk.blocks:
                fully_shard(block)
            fully_shard(model)
            torch.manual_seed(1 + rank)
            model(torch.randint(0, 50, (2, 16))).pow(2).mean().backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            out[ck] = (grads, list(model.state_dict()))
        if rank == 0:
            torch.save(
                {
                    "equal": _equal(out[False][0], out[True][0]),
                    "keys": out[False][1] == out[True][1],
                },
                results,
            )
        dist.barrier()  # both ranks done before either tears gloo down (else an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_composes_with_fsdp2_fully_shard_on_two_ranks(tmp_path):
    """fully_shard on checkpointed blocks (its hooks stay outside the replay): the same gradients
    and state_dict keys as without checkpointing, 2 gloo ranks on the CPU."""
    import torch.multiprocessing as mp

    results = tmp_path / "results.pt"
    store = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_fsdp_worker, args=(store, str(results)), nprocs=2)
    outcome = torch.load(results, weights_only=True)
    assert outcome == {"equal": True, "keys": True}
