"""Planted faults and healthy runs: the doctor's test bench, and a runnable example of every rule.

Each case trains a small model in a plain PyTorch loop with a :class:`Doctor` attached, the way a
user would, and returns the doctor. A fault case names the rule it must trigger; a healthy case must
end without warnings or errors. ``benchmarks/doctor_suite.py`` runs them all and ``tests/doctor``
checks each one.

    from gradwise.doctor.cases import CASES
    doctor = CASES["GW304-dying-relu"].run()
    print(doctor.summary())
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor._casebook import (  # noqa: F401  (the registry and helpers, re-exported)
    CASES,
    Case,
    _blobs,
    _digits,
    _mlp,
    _sequences,
    _train,
    case,
)
from gradwise.doctor.doctor import Doctor
from gradwise.doctor.findings import Finding


@case("healthy-mlp", None, "MLP on standardised digits, AdamW 1e-3")
def healthy_mlp() -> Doctor:
    x, y, xv, yv = _digits()
    return _train(_mlp(64, 10), x, y, F.cross_entropy, steps=400, val=(xv, yv))


@case("healthy-cnn-bn", None, "CNN with BatchNorm on digits images")
def healthy_cnn() -> Doctor:
    x, y, xv, yv = _digits(flat=False)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    return _train(model, x, y, F.cross_entropy, steps=300, lr=3e-3, val=(xv, yv))


class _LSTMClassifier(nn.Module):
    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


@case("healthy-lstm", None, "LSTM sequence classifier, AdamW 3e-3, clipping")
def healthy_lstm() -> Doctor:
    x, y, xv, yv = _sequences()
    return _train(
        _LSTMClassifier(10, 2), x, y, F.cross_entropy, steps=300, lr=3e-3, clip=1.0, val=(xv, yv)
    )


@case("healthy-transformer", None, "gradwise's Transformer encoder on token sequences, AdamW")
def healthy_transformer() -> Doctor:
    from gradwise.models import build_model

    x, y, xv, yv = _sequences()
    model = build_model(
        "transformer",
        {"vocab_size": 10, "d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 20},
        num_outputs=2,
    )
    return _train(model, x, y, F.cross_entropy, steps=300, lr=1e-3, clip=1.0, val=(xv, yv))


@case("healthy-regression", None, "MLP regression on diabetes (standardised target), MSE")
def healthy_regression() -> Doctor:
    from gradwise.data import load_data

    bundle = load_data("diabetes")
    x, y = bundle.train.tensors
    xv, yv = bundle.val.tensors

    def mse(out, target):
        return F.mse_loss(out.squeeze(-1), target)

    return _train(
        _mlp(10, 1, hidden=32, depth=1), x, y, mse, steps=300, val=(xv, yv), task="regression"
    )


# -- planted faults ---------------------------------------------------------------------------


@case("GW101-nan-inputs", "GW101", "some input rows contain NaN")
def nan_inputs() -> Doctor:
    x, y = _blobs()
    x[::7, 3] = float("nan")
    return _train(_mlp(20, 4), x, y, F.cross_entropy, steps=20)


@case("GW102-raw-pixels", "GW102", "digits as raw 0-255 pixels, not standardised")
def raw_pixels() -> Doctor:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data * 16, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return _train(_mlp(64, 10), x, y, F.cross_entropy, steps=20)


@case("GW103-imbalance", "GW103", "binary labels 97% / 3%")
def imbalance() -> Doctor:
    x, _ = _blobs(n=2000, classes=2)
    y = (torch.rand(2000) < 0.03).long()
    return _train(_mlp(20, 2), x, y, F.cross_entropy, steps=40)


@case("GW104-train-val-leakage", "GW104", "the validation set was sampled from the training set")
def leakage():
    from gradwise.doctor.preflight import check

    x, y = _blobs()
    model = _mlp(20, 4)
    return check(
        model, (x, y), (x[::10], y[::10]), loss_fn=F.cross_entropy, overfit=False, lr_range=False
    )


@case(
    "GW105-targets-out-of-range", "GW105", "binary targets stored as 0/255 fed to BCEWithLogitsLoss"
)
def targets_out_of_range() -> Doctor:
    x, y = _blobs(classes=2)
    return _train(
        _mlp(20, 1), x, (y.float() * 255).unsqueeze(1), F.binary_cross_entropy_with_logits, steps=20
    )


@case(
    "GW201-softmax-into-cross-entropy", "GW201", "model ends in Softmax, loss is CrossEntropyLoss"
)
def softmax_head() -> Doctor:
    x, y = _blobs()
    model = nn.Sequential(_mlp(20, 4), nn.Softmax(dim=1))
    return _train(model, x, y, nn.CrossEntropyLoss(), steps=20)


@case("GW202-no-zero-grad", "GW202", "the loop never calls optimizer.zero_grad()")
def no_zero_grad() -> Doctor:
    x, y = _blobs()
    return _train(_mlp(20, 4), x, y, F.cross_entropy, steps=60, zero_grad=False)


@case(
    "GW203-eval-in-train-mode",
    "GW203",
    "validation under no_grad without model.eval(), with dropout",
)
def eval_train_mode() -> Doctor:
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4))
    return _train(
        model,
        x[:1500],
        y[:1500],
        F.cross_entropy,
        steps=60,
        val=(x[1500:], y[1500:]),
        eval_every=20,
        eval_mode=False,
    )


@case(
    "GW204-poor-init",
    "GW204",
    "10-layer tanh MLP, weights N(0, 0.01), zero biases: activations collapse",
)
def poor_init() -> Doctor:
    x, y = _blobs()
    model = _mlp(20, 4, hidden=64, depth=10, act=nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return _train(model, x, y, F.cross_entropy, steps=20)


@case("GW205-mse-on-class-indices", "GW205", "MSELoss regressing the class indices 0..9 of digits")
def mse_on_classes() -> Doctor:
    x, y, _, _ = _digits()
    model = nn.Sequential(_mlp(64, 1), nn.Flatten(0))
    return _train(model, x, y.float(), nn.MSELoss(), steps=20, task="multiclass")


@case("GW206-batchnorm-batch-2", "GW206", "BatchNorm trained with batches of 2")
def bn_tiny_batch() -> Doctor:
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    return _train(model, x, y, F.cross_entropy, steps=20, batch_size=2)


@case(
    "GW207-param-not-in-optimizer", "GW207", "the optimizer was built before the head was replaced"
)
def param_not_in_optimizer() -> Doctor:
    x, y = _blobs()
    model = _mlp(20, 4)
    params = list(model.parameters())[:-2]  # the last Linear is missing from the optimizer
    return _train(model, x, y, F.cross_entropy, steps=30, params=params)


@case(
    "GW301-log-of-zero", "GW301", "hand-written cross-entropy log(softmax(x)) underflows to log(0)"
)
def log_zero() -> Doctor:
    x, y = _blobs()

    def naive_ce(out, target):
        p = torch.softmax(out, dim=1)
        return -torch.log(p[torch.arange(len(target)), target]).mean()

    return _train(_mlp(20, 4), x * 50, y, naive_ce, steps=100, lr=0.5)


class _LinearRNN(nn.Module):
    """A deep (long) recurrence without a squashing non-linearity: gradients explode."""

    def __init__(self, outputs: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(1, 32)
        self.rec = nn.Linear(32, 32, bias=False)
        nn.init.orthogonal_(self.rec.weight, gain=1.15)
        self.head = nn.Linear(32, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h = self.rec(h) + self.inp(x[:, t : t + 1])
        return self.head(h)


@case(
    "GW302-exploding-rnn", "GW302", "linear RNN over 40 steps, no gradient clipping, SGD at lr 0.05"
)
def exploding_rnn() -> Doctor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 40, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    model = _LinearRNN()
    nn.init.orthogonal_(model.rec.weight, gain=0.9)
    return _train(model, x, y, F.cross_entropy, steps=150, lr=0.05, optimizer="sgd")


@case("GW303-deep-sigmoid", "GW303", "12-layer sigmoid MLP: gradients vanish toward the input")
def deep_sigmoid() -> Doctor:
    x, y = _blobs()
    return _train(
        _mlp(20, 4, hidden=32, depth=12, act=nn.Sigmoid),
        x,
        y,
        F.cross_entropy,
        steps=60,
        optimizer="sgd",
        lr=0.1,
    )


@case("GW304-dying-relu", "GW304", "hidden ReLU layer starts with bias -5: most units never fire")
def dying_relu() -> Doctor:
    x, y = _blobs()
    model = _mlp(20, 4, depth=1)
    nn.init.constant_(model[0].bias, -5.0)
    return _train(model, x, y, F.cross_entropy, steps=120)


@case("GW305-lr-10x-too-high", "GW305", "Adam at lr 0.3 on an MLP")
def lr_too_high() -> Doctor:
    x, y, _, _ = _digits()
    return _train(_mlp(64, 10), x, y, F.cross_entropy, steps=200, lr=0.3)


@case("GW306-lr-too-low", "GW306", "SGD at lr 1e-6")
def lr_too_low() -> Doctor:
    x, y, _, _ = _digits()
    return _train(_mlp(64, 10), x, y, F.cross_entropy, steps=200, lr=1e-6, optimizer="sgd")


@case("GW307-plateau", "GW307", "labels are random: nothing to learn, the loss stays flat")
def plateau() -> Doctor:
    x, _ = _blobs()
    y = torch.randint(0, 4, (2000,))
    return _train(_mlp(20, 4, hidden=8, depth=1), x, y, F.cross_entropy, steps=300, lr=1e-3)


@case(
    "GW308-oscillation",
    "GW308",
    "data sorted by label, never shuffled: the model chases each block",
)
def oscillation() -> Doctor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, generator=g)  # the features do not predict the label, so the
    y = (torch.arange(2048) // 32 % 4 == 3).long()  # model follows each block of sorted labels
    model = _mlp(20, 2, hidden=16, depth=1)
    return _train(model, x, y, F.cross_entropy, steps=200, lr=0.5, optimizer="sgd", shuffle=False)


@case(
    "GW309-saturated-tanh",
    "GW309",
    "tanh MLP initialised with std 1.0 on 64 inputs: units saturate",
)
def saturated_tanh() -> Doctor:
    x, y, _, _ = _digits()
    model = _mlp(64, 10, hidden=128, depth=3, act=nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    return _train(model, x, y, F.cross_entropy, steps=60)


@case("GW401-overfitting", "GW401", "wide MLP memorises 200 samples with 30% wrong labels")
def overfitting() -> Doctor:
    x, y, xv, yv = _digits()
    x, y = x[:200], y[:200].clone()
    noisy = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.3
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=torch.Generator().manual_seed(2))
    model = _mlp(64, 10, hidden=256)
    return _train(model, x, y, F.cross_entropy, steps=600, lr=3e-3, val=(xv, yv), eval_every=25)


@case(
    "GW402-labels-shuffled", "GW402", "labels shuffled independently of the inputs: stuck at chance"
)
def labels_shuffled() -> Doctor:
    x, y, _, _ = _digits()
    y = y[torch.randperm(len(y))]
    return _train(_mlp(64, 10, hidden=16, depth=1), x, y, F.cross_entropy, steps=400, lr=1e-3)


# -- fine-tuning: a "pretrained" backbone, then adapted -------------------------------------------


class _Backbone(nn.Module):
    """An MLP with a BatchNorm backbone and a head; ``keep_bn_eval`` keeps frozen BatchNorm
    layers in eval mode whenever the model is put in training mode (finetune.freeze_bn)."""

    def __init__(self, outputs: int = 4, keep_bn_eval: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()
        )
        self.head = nn.Linear(64, outputs)
        self.keep_bn_eval = keep_bn_eval

    def train(self, mode: bool = True) -> _Backbone:
        super().train(mode)
        if mode and self.keep_bn_eval:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm1d) and not m.weight.requires_grad:
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def pretrained_backbone(
    outputs: int = 4, keep_bn_eval: bool = False, steps: int = 150
) -> tuple[_Backbone, tuple[torch.Tensor, ...]]:
    """A small model trained on blob classification (the "original task"), and that task's data
    (x, y, x_val, y_val)."""
    x, y = _blobs(2400)
    torch.manual_seed(0)
    model = _Backbone(4, keep_bn_eval)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 2000, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if outputs != 4:
        model.head = nn.Linear(64, outputs)  # a new head for the new task
    return model, (x[:2000], y[:2000], x[2000:], y[2000:])


@case(
    "healthy-finetune-frozen-backbone",
    None,
    "pretrained backbone frozen on purpose (BatchNorm kept in eval), a new 2-class head trains",
)
def healthy_finetune() -> Doctor:
    model, (x, y, xv, yv) = pretrained_backbone(outputs=2, keep_bn_eval=True)
    model.backbone.requires_grad_(False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _train(
        model, x, y // 2, F.cross_entropy, steps=150, params=trainable, val=(xv, yv // 2),
        frozen_on_purpose=frozen,
    )  # fmt: skip


@case("GW208-head-frozen", "GW208", "the new head was frozen together with the backbone")
def head_frozen() -> Doctor:
    model, (x, y, _, _) = pretrained_backbone(outputs=2)
    model.backbone[2:].requires_grad_(False)  # meant: freeze the backbone's top...
    model.head.requires_grad_(False)  # ...and by mistake the head as well
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _train(model, x, y // 2, F.cross_entropy, steps=30, params=trainable)


@case(
    "GW209-frozen-bn-train-mode",
    "GW209",
    "a frozen backbone's BatchNorm left in training mode: its running statistics drift",
)
def frozen_bn_train_mode() -> Doctor:
    model, (x, y, _, _) = pretrained_backbone(outputs=2, keep_bn_eval=False)
    model.backbone.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shifted = x * 1.5 + 0.5  # the new domain: the batches' statistics differ from pre-training
    return _train(model, shifted, y // 2, F.cross_entropy, steps=45, params=trainable)


@case(
    "GW403-forgetting",
    "GW403",
    "fine-tuned at a high rate on the same inputs with the labels remapped; a probe set of the "
    "original task watches",
)
def forgetting() -> Doctor:
    model, (x, y, xv, yv) = pretrained_backbone()
    remapped = (y + 1) % 4
    return _train(
        model, x, remapped, F.cross_entropy, steps=150, lr=3e-3, val=(xv, (yv + 1) % 4),
        eval_every=50, probe=(xv, yv),
    )  # fmt: skip


@case(
    "GW210-rank-desync",
    "GW210",
    "2 processes (gloo) under DDP; rank 1 re-initialises the head after DDP was built",
)
def rank_desync() -> RankFindings:
    return two_ranks("desync")


@dataclass
class RankFindings:
    """What rank 0's Doctor found in a run of two processes (their Doctors die with them)."""

    findings: list[Finding]


def two_ranks(scenario: str, timeout: float = 120.0) -> RankFindings:
    """Run ``scenario`` of :func:`_rank_main` on 2 processes, as torchrun starts them (gloo on
    the CPU); rank 0's findings."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gradwise-ranks-") as out:
        code = "from gradwise.doctor.cases import _rank_main; _rank_main()"
        procs = []
        for rank in range(2):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1",
                "GRADWISE_CASE": scenario,
                "GRADWISE_CASE_OUT": out,
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
                )
            )
        try:
            errors = [p.communicate(timeout=timeout)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, err in zip(procs, errors, strict=True):
            if p.returncode:
                raise RuntimeError(f"a rank failed ({p.returncode}):\n{err[-2000:]}")
        with open(os.path.join(out, "findings.json"), encoding="utf-8") as fh:
            return RankFindings([Finding(**d) for d in json.load(fh)])


def _rank_main() -> None:
    """One rank of :func:`two_ranks`: an MLP on blobs under DDP with a Doctor on every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        x, y = _blobs(n=512)
        model = _mlp(20, 4)
        ddp = DistributedDataParallel(model)
        if os.environ["GRADWISE_CASE"] == "desync" and rank == 1:
            torch.manual_seed(1)  # a rank-dependent re-initialisation after DDP's broadcast
            model[-1].reset_parameters()
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        doctor = Doctor(ddp, opt, loss_fn=F.cross_entropy, on_finding=None)
        for step in range(40):
            lo = (step * 32 + rank * 16) % len(x)
            xb, yb = x[lo : lo + 16], y[lo : lo + 16]
            opt.zero_grad()
            out = ddp(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            doctor.step(loss, inputs=xb, outputs=out, targets=yb)
            opt.step()
        doctor.sync()
        doctor.close()
        if rank == 0:
            path = os.path.join(os.environ["GRADWISE_CASE_OUT"], "findings.json")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump([finding.to_dict() for finding in doctor.findings], fh)
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


# -- faulty recipes that doctor.mode: repair fixes (benchmarks/doctor_repair.py, tests) ---------


def naive_cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy written by hand as -log(softmax): underflows to log(0) for confident logits."""
    p = torch.softmax(out.float(), dim=1)
    return -torch.log(p[torch.arange(len(target)), target]).mean()


def linear_rnn(num_outputs: int = 2, gain: float = 0.9) -> nn.Module:
    """A deep-in-time recurrence without a squashing non-linearity (gradients can explode)."""
    model = _LinearRNN(num_outputs)
    nn.init.orthogonal_(model.rec.weight, gain=gain)
    return model


def sequence_data(n: int = 2000, length: int = 40, seed: int = 0, val_fraction: float = 0.2):
    """Float sequences [n, length]; the label is the sign of the sum of the first five values."""
    from gradwise.data import DataBundle, as_dataset, describe

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    cut = int(n * (1 - val_fraction))
    train, val = as_dataset((x[:cut], y[:cut])), as_dataset((x[cut:], y[cut:]))
    return DataBundle(train, val, describe(train, name="sequences"))


NO_SAFETY_NETS = {"grad_clip": None}  # the faulty recipes also switched gradient clipping off

REPAIR_RECIPES: dict[str, dict] = {
    # SGD trains this MLP well at lr 0.1; at 1.0 it diverges within a few dozen steps
    "lr-10x-too-high": {
        "name": "repair-lr",
        "model": {"name": "mlp", "kwargs": {"hidden": [128, 128], "dropout": 0.0, "norm": None}},
        "data": {"name": "digits", "kwargs": {"flatten": True}, "batch_size": 32},
        "optim": {"name": "sgd", "lr": 1.0},
        "schedule": {"warmup": 0},
        "train": {"epochs": 8, **NO_SAFETY_NETS},
    },
    # a linear recurrence over 40 steps: occasional gradient spikes blow it up without clipping
    "rnn-without-clipping": {
        "name": "repair-rnn",
        "model": {"name": "gradwise.doctor.cases:linear_rnn"},
        "data": {"name": "gradwise.doctor.cases:sequence_data", "batch_size": 32},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup": 0},
        "train": {"epochs": 8, **NO_SAFETY_NETS},
    },
    # -log(softmax(x)) written by hand: confident wrong logits make it log(0) = inf, then NaN
    "log-of-zero": {
        "name": "repair-log0",
        "task": "custom",
        "model": {
            "name": "mlp",
            "kwargs": {"hidden": [128], "dropout": 0.0, "norm": None, "num_outputs": 10},
        },
        "data": {"name": "digits", "kwargs": {"flatten": True}, "batch_size": 32},
        "optim": {"lr": 0.3},
        "train": {
            "epochs": 8,
            "loss": "gradwise.doctor.cases:naive_cross_entropy",
            **NO_SAFETY_NETS,
        },
    },
}

from gradwise.doctor import ported  # noqa: E402,F401  (registers the cases ported from public reports)
