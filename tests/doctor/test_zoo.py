"""The doctor never breaks the run it watches, and never cries wolf, whatever the model looks like.

A zoo of small, healthy, structurally different models (shared and reused modules, functional
activations, ModuleList/ModuleDict, tuple/dict/dataclass outputs, packed RNN sequences, attention,
buffers, tied, frozen and unfrozen weights, parametrisations, mixtures of experts, LoRA and prompt
tuning by hand, Hugging Face models built from tiny configs, a compiled and a TorchScript part,
bf16, sparse gradients, gradient accumulation) is trained in a plain PyTorch loop with a Doctor
attached, as users write it: ``zero_grad``, forward, loss, ``backward``, ``doctor.step``,
``optimizer.step``, then a validation under ``torch.no_grad()`` and ``doctor.validate``. Each must
finish with no exception, no "check failed" warning, no warning- or error-level finding and, after
``close()``, the model exactly as it was: no hook left behind and the same outputs with and without
the Doctor. The runs are short (past the steps where the pooled and never-a-gradient checks judge)
except one language model that trains long enough for the rules that wait for many steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import pack_padded_sequence

from gradwise.doctor import Doctor
from gradwise.errors import GradwiseWarning

STEPS = 22  # past step 19 (class-balance pooling) and step 20 (GW207's never-a-gradient check)
VALIDATE_EVERY = 11  # two validations
SAMPLE_EVERY = 2
BATCH, FEATURES, HIDDEN, CLASSES = 16, 12, 24, 4
VOCAB, SEQ = 50, 8

# ----------------------------------------------------------------------------- data


def _gen(step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1_000 * salt + step)


def features(step: int, shape: tuple[int, ...] = (BATCH, FEATURES)) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(step))


def labels(step: int, n: int = BATCH, k: int = CLASSES) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=_gen(step, 1))


def tokens(step: int, n: int = BATCH, t: int = SEQ) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, t), generator=_gen(step, 2))


def tabular(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return features(step), labels(step)


def sentences(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens(step), labels(step)


def sequences(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return features(step, (BATCH, SEQ, FEATURES)), labels(step)


def images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return features(step, (BATCH, 3, 8, 8)), labels(step)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)


def call(model: nn.Module, x: Any) -> Any:
    return model(x)


def same(out: Any) -> Any:
    return out


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


@dataclass
class Zoo:
    """One healthy model and how a user's loop feeds and scores it."""

    model: nn.Module
    batch: Callable[[int], tuple[Any, Any]] = tabular  # step -> (inputs, targets)
    loss: Callable[[Any, Any], torch.Tensor] = ce  # (raw output, targets) -> loss
    forward: Callable[[nn.Module, Any], Any] = call
    shown: Callable[[Any], Any] = same  # what the loop passes as doctor.step(outputs=...)
    loss_fn: Any = None  # given to the Doctor (most users give none)
    doctor: dict[str, Any] = field(default_factory=dict)  # other Doctor arguments
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = adamw
    accumulate: int = 1  # micro-batches per optimizer step (declared to the Doctor)
    clip: float | None = None  # clip the gradient norm and hand it to the Doctor
    before_step: Callable[[nn.Module, int], None] | None = None  # e.g. unfreeze a layer
    steps: int = STEPS


# ----------------------------------------------------------------------------- the zoo


def mlp(d_in: int = FEATURES, d_out: int = CLASSES) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, d_out),
    )


def plain_mlp() -> Zoo:
    return Zoo(mlp(), loss_fn=nn.CrossEntropyLoss())


class FunctionalActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(FEATURES, 32), nn.Linear(32, 16), nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.silu(F.gelu(self.b(F.relu(self.a(x))))))


class ReusedActivation(nn.Module):
    """One nn.ReLU applied after layers of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(FEATURES, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class SharedLinear(nn.Module):
    """One Linear called twice in a forward pass (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.act, self.out = nn.Tanh(), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        h = self.act(self.shared(h)) + h
        h = self.act(self.shared(h)) + h
        return self.out(h)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU()) for _ in range(3)
        )
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class Routed(nn.Module):
    """A ModuleDict of branches; each sample goes to one by the sign of its first feature."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(
            {k: nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU()) for k in ("neg", "pos")}
        )
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = x[:, :1] > 0
        h = torch.where(pos, self.branches["pos"](x), self.branches["neg"](x))
        return self.head(h)


class MultiTask(nn.Module):
    """A shared trunk and one head per task in a ModuleDict; the tasks take turns, batch by batch
    (round-robin multi-task training)."""

    tasks = ("topic", "sentiment")

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, CLASSES) for t in self.tasks})

    def forward(self, batch: tuple[str, torch.Tensor]) -> torch.Tensor:
        task, x = batch
        return self.heads[task](self.trunk(x))


def multitask_batch(step: int) -> tuple[tuple[str, torch.Tensor], torch.Tensor]:
    return (MultiTask.tasks[step % 2], features(step)), labels(step)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h  # (logits, features for some auxiliary use)


class DictOut(TupleOut):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = self.body(x)
        return {"logits": self.head(h), "features": h}


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassOut(TupleOut):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        h = self.body(x)
        return Output(logits=self.head(h), hidden=h)


def nested_sequential() -> Zoo:
    def block() -> nn.Sequential:
        return nn.Sequential(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU()), nn.Identity())

    model = nn.Sequential(
        nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU()),
        nn.Sequential(block(), block()),
        nn.Linear(HIDDEN, CLASSES),
    )
    return Zoo(model)


def cnn_batchnorm() -> Zoo:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )
    return Zoo(model, images, loss_fn=F.cross_entropy)


def conv1d_sequence() -> Zoo:
    model = nn.Sequential(
        nn.Conv1d(FEATURES, 16, 3, padding=1),
        nn.GELU(),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )
    return Zoo(model, lambda s: (features(s, (BATCH, FEATURES, SEQ)), labels(s)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(HIDDEN),
                nn.Linear(HIDDEN, 2 * HIDDEN),
                nn.GELU(),
                nn.Linear(2 * HIDDEN, HIDDEN),
            )
            for _ in range(3)
        )
        self.norm, self.out = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.norm(h))


def layernorm_gelu() -> Zoo:
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.LayerNorm(HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.LayerNorm(HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    return Zoo(model)


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], batch_first: bool = True) -> None:
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


class PackedLSTM(nn.Module):
    """An LSTM over a padded batch of sequences of different lengths, packed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.rnn = nn.LSTM(16, HIDDEN, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, lengths = batch
        packed = pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], dim=-1))


def padded_sentences(step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    lengths = torch.randint(2, SEQ + 1, (BATCH,), generator=_gen(step, 3))
    ids = tokens(step) * (torch.arange(SEQ) < lengths[:, None])
    return (ids, lengths), labels(step)


class MeanPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(16, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


class EmbeddingBagModel(nn.Module):
    """Flat token ids with offsets (the torchtext text-classification tutorial)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 16, mode="mean")
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(0, ids.numel(), SEQ)
        return self.head(self.bag(ids, offsets))


class TinyLM(nn.Module):
    """A causal language model whose output projection shares the embedding matrix, with the
    causal mask and the positions as buffers; ``prefix`` embeddings may precede the tokens."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, HIDDEN)
        self.register_buffer("positions", torch.randn(2 * SEQ, HIDDEN) * 0.1)  # fixed
        mask = torch.triu(torch.full((2 * SEQ, 2 * SEQ), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        if prefix is not None:
            h = torch.cat([prefix.expand(len(ids), -1, -1), h], dim=1)
        t = h.shape[1]
        h = h + self.positions[:t]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / HIDDEN**0.5 + self.causal_mask[:t, :t]
        h = h + self.proj(scores.softmax(-1) @ v)
        return self.lm_head(self.norm(h))[:, t - ids.shape[1] :]


def lm_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(step)
    return ids, torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)


class PromptTuned(nn.Module):
    """Prompt tuning: a frozen language model, and trainable prompt embeddings before the text."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = TinyLM().requires_grad_(False)
        self.prompt = nn.Parameter(torch.randn(1, 4, HIDDEN) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, prefix=self.prompt)


LONG_VOCAB = 200


def bigram_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text with a learnable structure: each token is the previous one plus 0..9."""
    jumps = torch.randint(0, 10, (BATCH, SEQ), generator=_gen(step, 6))
    ids = jumps.cumsum(1) + torch.randint(0, LONG_VOCAB, (BATCH, 1), generator=_gen(step, 7))
    ids = ids % LONG_VOCAB
    return ids, torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)


def long_lm() -> Zoo:
    """Long enough for the rules that wait for many steps (plateau, chance level, oscillation)."""

    return Zoo(
        TinyLM(LONG_VOCAB),
        bigram_batch,
        token_ce,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=lambda m: adamw(m, lr=1e-2),
        steps=240,
    )


class Normalised(nn.Module):
    """Raw inputs in their natural units, standardised inside the model by fixed buffers (the
    training split's statistics), next to a non-persistent integer counter buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((FEATURES,), 50.0))
        self.register_buffer("std", torch.full((FEATURES,), 10.0))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.net((x - self.mean) / self.std)


def raw_units(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 50 + 10 * features(step), labels(step)


class SparseEmbedding(nn.Module):
    """Sparse embedding gradients (recommenders, word2vec), trained with plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, sparse=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (LoRA, written by hand)."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def lora() -> Zoo:
    model = mlp()
    for i in (0, 2, 4):
        model[i] = LoRALinear(model[i])
    return Zoo(model)


def log_softmax_nll() -> Zoo:
    return Zoo(nn.Sequential(*mlp(), nn.LogSoftmax(-1)), loss=F.nll_loss, loss_fn=nn.NLLLoss())


def bf16_weights() -> Zoo:
    return Zoo(
        mlp().to(torch.bfloat16),
        lambda s: (features(s).bfloat16(), labels(s)),
        loss=lambda o, y: F.cross_entropy(o.float(), y),
    )


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        layer = nn.TransformerEncoderLayer(HIDDEN, 2, 2 * HIDDEN, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)
        return self.head(h.mean(1))


class AttentionPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.1)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        self_attended, _ = self.attn(h, h, h, need_weights=False)
        pooled, _ = self.attn(self.query.expand(len(x), -1, -1), self_attended, self_attended)
        return self.head(pooled[:, 0])


class RootParameters(nn.Module):
    """Parameters owned by the root module itself: a class token, positions, a temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, FEATURES) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, SEQ + 1, FEATURES) * 0.1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.mix, self.head = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        h = F.relu(self.mix(h))
        return self.head(h[:, 0] + h[:, 1:].mean(1)) / self.log_temperature.exp()


class FrozenBackbone(nn.Module):
    """A frozen (pretrained) backbone under a trainable head, declared frozen on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU())
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class FrozenBatchNormBackbone(nn.Module):
    """A frozen CNN backbone with BatchNorm kept in eval mode (its running statistics frozen
    too), as fine-tuning recipes do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(8, CLASSES)

    def train(self, mode: bool = True) -> FrozenBatchNormBackbone:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def weight_normed() -> Zoo:
    model = mlp()
    parametrizations.weight_norm(model[0])
    parametrizations.weight_norm(model[2])
    return Zoo(model)


def spectral_normed() -> Zoo:
    model = mlp()
    parametrizations.spectral_norm(model[0])
    parametrizations.spectral_norm(model[4])
    return Zoo(model)


def identity_flatten() -> Zoo:
    model = nn.Sequential(
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, HIDDEN),
        nn.ReLU(),
        nn.Identity(),
        nn.Unflatten(1, (4, HIDDEN // 4)),
        nn.Flatten(),
        nn.Linear(HIDDEN, CLASSES),
    )
    return Zoo(model, images)


def dropout_batchnorm() -> Zoo:
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(HIDDEN, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(HIDDEN, CLASSES),
    )
    return Zoo(model, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))


class MixtureOfExperts(nn.Module):
    """Top-1 routing of tokens to experts (Switch Transformer style); the gate's probability
    scales each expert's output (so the router learns), and an expert without tokens is skipped."""

    def __init__(self, experts: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.router = nn.Linear(HIDDEN, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.ReLU(), nn.Linear(2 * HIDDEN, HIDDEN))
            for _ in range(experts)
        )
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, HIDDEN)  # tokens
        probs = self.router(h).softmax(-1)
        gate, choice = probs.max(-1)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().flatten()
            if rows.numel():
                mixed = mixed.index_add(0, rows, gate[rows, None] * expert(h[rows]))
        h = (h + mixed).reshape(x.shape[0], -1, HIDDEN).mean(1)
        return self.head(h)


class SqueezeExcite(nn.Module):
    """Channel attention: a sigmoid gate per channel from pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.SiLU()
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
            nn.ReLU(),
            nn.Linear(4, 16),
            nn.Sigmoid(),
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h = h * self.squeeze(h)[:, :, None, None]
        return self.head(h.mean((2, 3)))


def depthwise_groupnorm() -> Zoo:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1),
        nn.GroupNorm(4, 16),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.GroupNorm(4, 16),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )
    return Zoo(model, images)


def autoencoder() -> Zoo:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ELU(),
        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
    )
    return Zoo(
        model, lambda s: (features(s, (BATCH, 3, 8, 8)),) * 2, loss=F.mse_loss, loss_fn=F.mse_loss
    )


class Siamese(nn.Module):
    """One encoder applied to two inputs; the pair's similarity is a logit."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 16))
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = (self.encoder(x) for x in pair)
        return self.scale * F.cosine_similarity(a, b)


def pairs(step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    a = features(step)
    b = a + torch.randn(a.shape, generator=_gen(step, 4))
    return (a, b), (labels(step, k=2)).float()


class Checkpointed(nn.Module):
    """Blocks recomputed in the backward pass (activation checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU()) for _ in range(2)
        )
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return self.out(h)


class Tagger(nn.Module):
    """Per-token labels over batches padded to their own longest sentence (dynamic padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.rnn = nn.GRU(16, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def tagged(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = 4 + step % 5  # each batch padded to its own length
    lengths = torch.randint(2, t + 1, (BATCH,), generator=_gen(step, 3))
    pad = torch.arange(t) >= lengths[:, None]
    ids = tokens(step, t=t).masked_fill(pad, 0)
    tags = torch.randint(0, CLASSES, (BATCH, t), generator=_gen(step, 5)).masked_fill(pad, -100)
    return ids, tags


class Scripted(nn.Module):
    """A TorchScript-compiled block inside an eager model."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():  # deprecated in favour of torch.compile, still common
            warnings.simplefilter("ignore", DeprecationWarning)
            self.body = torch.jit.script(nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU()))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Distillation(nn.Module):
    """A student trained against a frozen teacher (kept in eval mode) run in the same forward."""

    def __init__(self) -> None:
        super().__init__()
        self.student = mlp()
        self.teacher = mlp().requires_grad_(False)

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student(x), self.teacher(x)


def distillation_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    student, teacher = out
    soft = F.kl_div(student.log_softmax(-1), teacher.softmax(-1), reduction="batchmean")
    return F.cross_entropy(student, y) + soft


class TwoHeads(nn.Module):
    """Classification and regression heads; dict outputs and dict targets."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.cls, self.reg = nn.Linear(HIDDEN, CLASSES), nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"class": self.cls(h), "value": self.reg(h)[:, 0]}


def two_targets(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return features(step), {"class": labels(step), "value": features(step + 900, (BATCH,))}


def two_losses(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out["class"], y["class"]) + F.mse_loss(out["value"], y["value"])


def one_hot_targets(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities as targets (one-hot rows), as CrossEntropyLoss accepts them."""
    return features(step), F.one_hot(labels(step, k=20), 20).float()


def unfreeze_first_layer(model: nn.Module, step: int) -> None:
    if step == STEPS // 2:  # gradual unfreezing; the optimizer holds every parameter
        model[0].requires_grad_(True)


def gradual_unfreezing() -> Zoo:
    model = mlp()
    model[0].requires_grad_(False)
    return Zoo(
        model,
        optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        before_step=unfreeze_first_layer,
        doctor={"frozen_on_purpose": ["0"]},
    )


class MaskedLogits(nn.Module):
    """Invalid actions masked with -inf before the softmax (action masking, constrained vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_out=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).masked_fill(x[:, :6] < -1.0, float("-inf"))


def allowed_actions(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = features(step)
    allowed = (x[:, :6] >= -1.0).float() + 1e-9  # a row with none allowed is all but impossible
    return x, torch.multinomial(allowed, 1, generator=_gen(step, 8))[:, 0]


class UNet(nn.Module):
    """Per-pixel classification: down, up (transposed convolution) and a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        return self.head(torch.cat([skip, self.up(self.mid(self.pool(skip)))], dim=1))


def pixel_labels(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return features(step, (BATCH, 3, 8, 8)), torch.randint(
        0, CLASSES, (BATCH, 8, 8), generator=_gen(step, 9)
    )


def regression() -> Zoo:
    return Zoo(
        mlp(d_out=1),
        lambda s: (features(s), features(s + 500, (BATCH, 1))),
        loss=F.mse_loss,
        loss_fn=nn.MSELoss(),
    )


def binary() -> Zoo:
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return features(step), labels(step, k=2).float()

    return Zoo(
        mlp(d_out=1),
        batch,
        loss=lambda o, y: F.binary_cross_entropy_with_logits(o[:, 0], y),
        shown=lambda o: o[:, 0],
        loss_fn=F.binary_cross_entropy_with_logits,
    )


def multilabel() -> Zoo:
    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return features(step), (features(step + 700, (BATCH, 5)) > 0).float()

    bce = nn.BCEWithLogitsLoss()
    return Zoo(mlp(d_out=5), batch, loss=bce, loss_fn=bce)


def compiled() -> Zoo:
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    return Zoo(torch.compile(model, backend="eager"))  # the cheapest backend: tracing is the test


def autocast_bf16() -> Zoo:
    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return Zoo(Residual(), forward=forward, loss=lambda o, y: F.cross_entropy(o.float(), y))


# Hugging Face models from tiny configs (nothing is downloaded)


def hf_classifier(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids, y = sentences(step)
    ids[: BATCH // 2, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": y}, y


def hf_lm(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = tokens(step)
    return {"input_ids": ids, "labels": ids}, ids


def hf_call(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def own_loss(out: Any, y: Any) -> torch.Tensor:
    return out.loss


def logits(out: Any) -> torch.Tensor:
    return out.logits


def bert() -> Zoo:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=CLASSES,
    )
    return Zoo(BertForSequenceClassification(config), hf_classifier, own_loss, hf_call, logits)


def distilbert() -> Zoo:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=32,
        num_labels=CLASSES,
    )
    return Zoo(DistilBertForSequenceClassification(config), hf_classifier, own_loss, hf_call)


def gpt2() -> Zoo:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return Zoo(GPT2LMHeadModel(config), hf_lm, own_loss, hf_call)  # outputs: the ModelOutput


def t5() -> Zoo:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )

    def batch(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = tokens(step)
        target = ids.flip(1)[:, : SEQ // 2].contiguous()
        return {"input_ids": ids, "labels": target}, target

    return Zoo(T5ForConditionalGeneration(config), batch, own_loss, hf_call, logits)


ZOO: list[tuple[str, Callable[[], Zoo]]] = [
    ("plain_mlp", plain_mlp),
    ("functional_activations", lambda: Zoo(FunctionalActivations())),
    ("relu_reused_at_two_widths", lambda: Zoo(ReusedActivation(), loss_fn=F.cross_entropy)),
    ("linear_called_twice", lambda: Zoo(SharedLinear())),
    ("module_list", lambda: Zoo(Blocks())),
    ("module_dict_routing", lambda: Zoo(Routed())),
    ("module_dict_alternating_tasks", lambda: Zoo(MultiTask(), multitask_batch)),
    ("tuple_output", lambda: Zoo(TupleOut(), loss=lambda o, y: ce(o[0], y))),
    ("dict_output", lambda: Zoo(DictOut(), loss=lambda o, y: ce(o["logits"], y))),
    ("dataclass_output", lambda: Zoo(DataclassOut(), loss=lambda o, y: ce(o.logits, y))),
    ("nested_sequential", nested_sequential),
    ("cnn_batchnorm_maxpool", cnn_batchnorm),
    ("conv1d_sequence", conv1d_sequence),
    ("residual_layernorm", lambda: Zoo(Residual())),
    ("layernorm_gelu", layernorm_gelu),
    ("gru_classifier", lambda: Zoo(RNNClassifier(nn.GRU), sequences)),
    ("lstm_classifier", lambda: Zoo(RNNClassifier(nn.LSTM), sequences)),
    (
        "lstm_sequence_first",
        lambda: Zoo(
            RNNClassifier(nn.LSTM, batch_first=False),
            lambda s: (sequences(s)[0].transpose(0, 1), labels(s)),
        ),
    ),
    ("lstm_packed_sequence", lambda: Zoo(PackedLSTM(), padded_sentences)),
    ("embedding_mean_pool", lambda: Zoo(MeanPool(), sentences)),
    ("embedding_bag", lambda: Zoo(EmbeddingBagModel(), lambda s: (tokens(s).flatten(), labels(s)))),
    ("tied_embeddings_lm", lambda: Zoo(TinyLM(), lm_batch, token_ce, loss_fn=F.cross_entropy)),
    ("normalisation_buffers_raw_inputs", lambda: Zoo(Normalised(), raw_units)),
    ("transformer_encoder_clipped", lambda: Zoo(Encoder(), sentences, clip=1.0)),
    ("multihead_attention_pool", lambda: Zoo(AttentionPool(), sequences)),
    ("root_parameters", lambda: Zoo(RootParameters(), sequences)),
    (
        "frozen_backbone_declared",
        lambda: Zoo(FrozenBackbone(), doctor={"frozen_on_purpose": ["backbone"]}),
    ),
    (
        "frozen_batchnorm_backbone_in_eval",
        lambda: Zoo(
            FrozenBatchNormBackbone(), images, doctor={"frozen_on_purpose": ["backbone.*"]}
        ),
    ),
    ("weight_norm", weight_normed),
    ("spectral_norm", spectral_normed),
    ("identity_flatten_unflatten", identity_flatten),
    ("dropout_batchnorm1d", dropout_batchnorm),
    ("mixture_of_experts_top1", lambda: Zoo(MixtureOfExperts(), sequences)),
    ("squeeze_excite_sigmoid_gate", lambda: Zoo(SqueezeExcite(), images)),
    ("depthwise_groupnorm", depthwise_groupnorm),
    ("conv_autoencoder_mse", autoencoder),
    ("siamese_two_inputs", lambda: Zoo(Siamese(), pairs, F.binary_cross_entropy_with_logits)),
    ("activation_checkpointing", lambda: Zoo(Checkpointed())),
    ("tagger_dynamic_padding", lambda: Zoo(Tagger(), tagged, token_ce)),
    ("regression_mse", regression),
    ("binary_bce_logits", binary),
    ("multilabel_bce_logits", multilabel),
    ("autocast_bf16", autocast_bf16),
    ("torch_compile", compiled),
    ("sparse_embedding_sgd", lambda: Zoo(SparseEmbedding(), sentences, optimizer=sgd)),
    ("lora_by_hand", lora),
    ("prompt_tuning_frozen_lm", lambda: Zoo(PromptTuned(), lm_batch, token_ce)),
    ("log_softmax_nll", log_softmax_nll),
    ("bf16_weights", bf16_weights),
    ("gradient_accumulation", lambda: Zoo(Residual(), accumulate=2)),
    ("lm_240_steps", long_lm),
    ("torchscript_submodule", lambda: Zoo(Scripted())),
    ("distillation_frozen_teacher", lambda: Zoo(Distillation(), loss=distillation_loss)),
    ("dict_targets_two_heads", lambda: Zoo(TwoHeads(), two_targets, two_losses)),
    (
        "one_hot_targets_20_classes",
        lambda: Zoo(mlp(d_out=20), one_hot_targets, loss_fn=nn.CrossEntropyLoss()),
    ),
    ("gradual_unfreezing", gradual_unfreezing),
    (
        "masked_logits_neg_inf",
        lambda: Zoo(MaskedLogits(), allowed_actions, loss_fn=F.cross_entropy),
    ),
    ("unet_segmentation", lambda: Zoo(UNet(), pixel_labels, loss_fn=nn.CrossEntropyLoss())),
    ("hf_bert_classifier", bert),
    ("hf_distilbert_classifier", distilbert),
    ("hf_gpt2_lm_tied", gpt2),
    ("hf_t5_seq2seq", t5),
]


# ----------------------------------------------------------------------------- the loop


def _hooks(model: nn.Module) -> dict[str, int]:
    """How many hooks each module and parameter carries."""
    counts = {}
    for name, m in model.named_modules():
        counts[f"module {name!r}"] = sum(
            len(getattr(m, attr, None) or {})
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
    for name, p in model.named_parameters():
        counts[f"parameter {name!r}"] = len(p._backward_hooks or {})
    return counts


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, tuple, dict, dataclass or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if is_dataclass(out):
        return [t for f in fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def _validate(case: Zoo, doctor: Doctor, step: int) -> None:
    x, y = case.batch(10_000 + step)
    case.model.eval()
    with torch.no_grad():
        loss = case.loss(case.forward(case.model, x), y)
    doctor.validate(loss=loss)
    case.model.train()


def train(case: Zoo) -> tuple[Doctor, list[warnings.WarningMessage]]:
    """The user's loop with a Doctor; returns it (closed) and the warnings raised meanwhile."""
    model, k = case.model, case.accumulate
    hooks_before = _hooks(model)
    optimizer = case.optimizer(model)
    extra = {"accumulation_steps": k} if k > 1 else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor = Doctor(
            model,
            optimizer,
            loss_fn=case.loss_fn,
            on_finding=None,
            sample_every=SAMPLE_EVERY,
            **extra,
            **case.doctor,
        )
        model.train()
        for step in range(case.steps):
            if case.before_step is not None:
                case.before_step(model, step)
            x, y = case.batch(step)
            if step % k == 0:
                optimizer.zero_grad()
            out = case.forward(model, x)
            loss = case.loss(out, y)
            (loss / k).backward()
            norm = None
            if case.clip is not None:
                norm = nn.utils.clip_grad_norm_(model.parameters(), case.clip)
            doctor.step(loss, inputs=x, outputs=case.shown(out), targets=y, grad_norm=norm)
            if (step + 1) % k == 0:
                optimizer.step()
            if (step + 1) % VALIDATE_EVERY == 0:
                _validate(case, doctor, step)
        # the same weights give the same outputs with the Doctor watching and after close()
        x, _ = case.batch(20_000)
        model.eval()
        watched = _tensors(case.forward(model, x))  # grad enabled: the armed hooks run
        doctor.close()
        plain = _tensors(case.forward(model, x))
    assert watched and len(watched) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(watched, plain, strict=True))
    assert _hooks(model) == hooks_before, "close() left hooks on the model"
    return doctor, caught


@pytest.mark.parametrize("build", [b for _, b in ZOO], ids=[i for i, _ in ZOO])
def test_the_doctor_watches_a_healthy_model_silently(build: Callable[[], Zoo]) -> None:
    torch.manual_seed(0)
    doctor, caught = train(build())
    failed = [str(w.message) for w in caught if issubclass(w.category, GradwiseWarning)]
    assert not failed, "a doctor check failed:\n" + "\n".join(failed)
    false = [str(f) for f in doctor.findings if f.severity in ("warning", "error")]
    assert not false, "false findings on a healthy model:\n" + "\n".join(false)


def test_the_zoo_is_large_and_distinct() -> None:
    assert len(ZOO) >= 32
    assert len({i for i, _ in ZOO}) == len(ZOO)
