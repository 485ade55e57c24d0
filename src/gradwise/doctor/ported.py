"""Training bugs ported from public reports: each fault as its reporter wrote it, and its fix.

Every bug here was reported in public (a GitHub issue or pull request, a PyTorch forum thread); the
case cites the report in ``source`` and says in its description what the reporter saw. Each is
rebuilt at small scale (scikit-learn's bundled digits, or synthetic data) with the reporter's kind
of model, loop and mistake, and the Doctor attached the way most users attach it:
``Doctor(model, optimizer)``, without naming the loss. Every fault ``ported-X`` has a fixed twin
``ported-X-fixed``, a healthy run that must end without warnings or errors.

Importing :mod:`gradwise.doctor.cases` registers these cases too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor._casebook import _batches, _blobs, _digits, _sequences, case
from gradwise.doctor.doctor import Doctor

# -- a user's data and loop -------------------------------------------------------------------


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).float().mean())


def _fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Callable,
    *,
    steps: int,
    batch_size: int = 32,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 50,
    eval_mode: bool = True,
    zero_grad: bool = True,
    metric: Callable | None = _accuracy,
    **doctor_kwargs,
) -> Doctor:
    """The plain loop most reports show: zero_grad, forward, loss, backward, step; every
    ``eval_every`` steps a validation pass under no_grad. The Doctor is attached as
    ``Doctor(model, optimizer)``: it is not told the loss."""
    doctor = Doctor(model, optimizer, on_finding=None, **doctor_kwargs)
    for step, idx in _batches(len(x), batch_size, steps):
        model.train()
        if zero_grad:
            optimizer.zero_grad()
        out = model(x[idx])
        loss = criterion(out, y[idx])
        loss.backward()
        doctor.step(loss, inputs=x[idx], outputs=out, targets=y[idx])
        optimizer.step()
        if val is not None and (step + 1) % eval_every == 0:
            if eval_mode:
                model.eval()
            with torch.no_grad():
                out = model(val[0])
                score = metric(out, val[1]) if metric is not None else None
                doctor.validate(loss=float(criterion(out, val[1])), metric=score)
    doctor.close()
    return doctor


def _digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 raw digits images scaled to [0, 1] ([N, 1, 8, 8]) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(digits.target)


def _noisy_masks(n: int = 1200) -> tuple[torch.Tensor, ...]:
    """A small segmentation task: noisy digit images and their foreground masks (train, val)."""
    images, _ = _digit_images()
    g = torch.Generator().manual_seed(0)
    masks = (images > 0.5).float()
    noisy = images + 0.3 * torch.randn(images.shape, generator=g)
    return noisy[:n], masks[:n], noisy[n:], masks[n:]


# -- GW201: probabilities into a loss that expects logits ----------------------------------------


def _softmax_mlp(softmax: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)]
    return nn.Sequential(*layers, nn.Softmax(dim=1)) if softmax else nn.Sequential(*layers)


def _softmax_into_cross_entropy(softmax: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _softmax_mlp(softmax)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=200, val=(xv, yv))


_FORUM_CE = "https://discuss.pytorch.org/t/cross-entropy-loss-is-not-decreasing/43814/16"


@case(
    "ported-softmax-crossentropy",
    "GW201",
    "an MLP ending in nn.Softmax(dim=1) trained with nn.CrossEntropyLoss; the reporter's loss "
    "stayed near ln(10) = 2.30 epoch after epoch",
    source=_FORUM_CE,
)
def softmax_crossentropy() -> Doctor:
    return _softmax_into_cross_entropy(softmax=True)


@case(
    "ported-softmax-crossentropy-fixed",
    None,
    "the same MLP returning raw logits to nn.CrossEntropyLoss",
    source=_FORUM_CE,
)
def softmax_crossentropy_fixed() -> Doctor:
    return _softmax_into_cross_entropy(softmax=False)


class _FastText(nn.Module):
    """The repository's text classifiers end in a softmax that feeds nn.NLLLoss."""

    def __init__(self, vocab: int, classes: int, log: bool) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, 32)
        self.fc = nn.Linear(32, classes)
        self.softmax = nn.LogSoftmax(dim=1) if log else nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.fc(self.embeddings(x).mean(1)))


def _nll_text_classifier(log: bool) -> Doctor:
    x, y, xv, yv = _sequences()
    model = _FastText(10, 2, log)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(model, optimizer, x, y, nn.NLLLoss(), steps=200, val=(xv, yv))


_NLL_ISSUE = "https://github.com/AnubhavGupta3377/Text-Classification-Models-Pytorch/issues/9"


@case(
    "ported-nll-on-softmax",
    "GW201",
    "a text classifier ending in nn.Softmax trained with nn.NLLLoss, which expects "
    "log-probabilities; the reporter noticed that the loss is always negative",
    source=_NLL_ISSUE,
)
def nll_on_softmax() -> Doctor:
    return _nll_text_classifier(log=False)


@case(
    "ported-nll-on-softmax-fixed",
    None,
    "the same text classifier ending in nn.LogSoftmax, with nn.NLLLoss",
    source=_NLL_ISSUE,
)
def nll_on_softmax_fixed() -> Doctor:
    return _nll_text_classifier(log=True)


class _TokenConfidence(nn.Module):
    """A binary confidence head, ``nn.Sequential(nn.Linear(dim, 1), nn.Sigmoid())`` in the report."""

    def __init__(self, sigmoid: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 64), nn.ReLU())
        head: list[nn.Module] = [nn.Linear(64, 1)]
        self.token = nn.Sequential(*head, nn.Sigmoid()) if sigmoid else nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token(self.encoder(x))


def _confidence_head(sigmoid: bool) -> Doctor:
    x, y = _blobs(n=1500, classes=2)
    y = y.float().unsqueeze(1)
    model = _TokenConfidence(sigmoid)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    val = (x[1200:], y[1200:])

    def accuracy(out: torch.Tensor, target: torch.Tensor) -> float:
        return float(((out > (0.5 if sigmoid else 0.0)).float() == target).float().mean())

    return _fit(
        model, optimizer, x[:1200], y[:1200], nn.BCEWithLogitsLoss(), steps=150, val=val,
        metric=accuracy,
    )  # fmt: skip


_DOUBLE_SIGMOID = "https://github.com/cvg/glue-factory/issues/89"


@case(
    "ported-sigmoid-bcewithlogits",
    "GW201",
    "a confidence head ending in nn.Sigmoid trained with nn.BCEWithLogitsLoss, which applies the "
    "sigmoid again; the reporter asked whether the sigmoid applied twice is a bug",
    source=_DOUBLE_SIGMOID,
)
def sigmoid_bcewithlogits() -> Doctor:
    return _confidence_head(sigmoid=True)


@case(
    "ported-sigmoid-bcewithlogits-fixed",
    None,
    "the same head returning the logit to nn.BCEWithLogitsLoss",
    source=_DOUBLE_SIGMOID,
)
def sigmoid_bcewithlogits_fixed() -> Doctor:
    return _confidence_head(sigmoid=False)


# -- GW215 / GW205: a regression loss on the wrong targets ---------------------------------------


def _diabetes_regression(squeeze: bool) -> Doctor:
    from gradwise.data import load_data

    bundle = load_data("diabetes")
    x, y = bundle.train.tensors
    xv, yv = bundle.val.tensors
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    if squeeze:
        model.append(nn.Flatten(0))  # [N, 1] -> [N], the shape of the targets
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(
        model, optimizer, x, y, nn.MSELoss(), steps=150, val=(xv, yv), eval_every=30, metric=None
    )


_MSE_SHAPES = "https://github.com/pytorch/pytorch/issues/16413"


@case(
    "ported-mse-broadcast",
    "GW215",
    "a regression MLP outputs [N, 1] against targets [N]: nn.MSELoss broadcasts them to [N, N] "
    "and compares every prediction with every target; the reporter lost two hours to an MSELoss "
    "that 'behaves strangely when shapes don't match'",
    source=_MSE_SHAPES,
)
def mse_broadcast() -> Doctor:
    return _diabetes_regression(squeeze=False)


@case(
    "ported-mse-broadcast-fixed",
    None,
    "the same regression with the output flattened to [N], the targets' shape",
    source=_MSE_SHAPES,
)
def mse_broadcast_fixed() -> Doctor:
    return _diabetes_regression(squeeze=True)


def _grade_cnn(classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )  # fmt: skip


def _ordinal_grades(regress: bool) -> Doctor:
    x, y, xv, yv = _digits(flat=False)
    keep, keep_v = y < 5, yv < 5  # five grades, 0..4
    x, y, xv, yv = x[keep], y[keep], xv[keep_v], yv[keep_v]
    if regress:
        model = _grade_cnn(1)

        def criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(out.squeeze(1), target.float())

        def metric(out: torch.Tensor, target: torch.Tensor) -> float:
            return float((out.squeeze(1).round() == target).float().mean())

    else:
        model, criterion, metric = _grade_cnn(5), nn.CrossEntropyLoss(), _accuracy
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(model, optimizer, x, y, criterion, steps=150, val=(xv, yv), metric=metric)


_ORDINAL = (
    "https://discuss.pytorch.org/t/using-mseloss-instead-of-crossentropy-for-ordinal-regression"
    "-classification/102473"
)


@case(
    "ported-mse-class-indices",
    "GW205",
    "a CNN with one output regresses the class index 0..4 with nn.MSELoss: the reporter preferred "
    "MSE to cross-entropy so that mistaking a 0 for a 1 would cost less than for a 4",
    source=_ORDINAL,
)
def mse_class_indices() -> Doctor:
    return _ordinal_grades(regress=True)


@case(
    "ported-mse-class-indices-fixed",
    None,
    "the same CNN with one logit per class and nn.CrossEntropyLoss",
    source=_ORDINAL,
)
def mse_class_indices_fixed() -> Doctor:
    return _ordinal_grades(regress=False)


# -- GW202 / GW216: gradients that are not zeroed, or zeroed too often ---------------------------


class _KeywordSpotter(nn.Module):
    """A GRU over frames of features (here the 8 rows of a digit) and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 32, batch_first=True)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.view(-1, 8, 8))
        return self.classifier(out[:, -1])


def _keyword_executor(zero_grad: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _KeywordSpotter()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(
        model, optimizer, x, y, nn.CrossEntropyLoss(), steps=200, val=(xv, yv), zero_grad=zero_grad
    )


_NO_ZERO_GRAD = "https://github.com/wenet-e2e/wekws/pull/73"


@case(
    "ported-no-zero-grad",
    "GW202",
    "a keyword-spotting executor calls loss.backward() and optimizer.step() but never "
    "optimizer.zero_grad(): every step applies the sum of all gradients so far; the fix's author "
    "noticed zero_grad missing from the training stage",
    source=_NO_ZERO_GRAD,
)
def no_zero_grad() -> Doctor:
    return _keyword_executor(zero_grad=False)


@case(
    "ported-no-zero-grad-fixed",
    None,
    "the same executor calling optimizer.zero_grad() before every backward()",
    source=_NO_ZERO_GRAD,
)
def no_zero_grad_fixed() -> Doctor:
    return _keyword_executor(zero_grad=True)


def _autoencoder_accumulation(zero_each_micro_batch: bool, accumulate: int = 4) -> Doctor:
    x, _, _, _ = _digits()
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(),
        nn.Linear(32, 64),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    doctor = Doctor(model, optimizer, on_finding=None, accumulation_steps=accumulate)
    for i, idx in _batches(len(x), 16, 240):
        if zero_each_micro_batch:
            optimizer.zero_grad(set_to_none=True)  # the bug: inside the micro-batch loop
        recon = model(x[idx])
        loss = F.mse_loss(recon, x[idx]) / accumulate
        loss.backward()
        doctor.step(loss, inputs=x[idx], outputs=recon, targets=x[idx])
        if (i + 1) % accumulate == 0:
            optimizer.step()
            if not zero_each_micro_batch:
                optimizer.zero_grad(set_to_none=True)
    doctor.close()
    return doctor


_ACCUMULATION = "https://github.com/bytetriper/RAE/issues/67"


@case(
    "ported-zero-grad-in-accumulation",
    "GW216",
    "an autoencoder trained with 4 accumulated micro-batches per step calls "
    "optimizer.zero_grad() inside the micro-batch loop, so each step uses the last micro-batch "
    "alone; the reporter saw that gradients are cleared every micro-batch instead of accumulated",
    source=_ACCUMULATION,
)
def zero_grad_in_accumulation() -> Doctor:
    return _autoencoder_accumulation(zero_each_micro_batch=True)


@case(
    "ported-zero-grad-in-accumulation-fixed",
    None,
    "the same accumulation loop calling zero_grad() after each optimizer step",
    source=_ACCUMULATION,
)
def zero_grad_in_accumulation_fixed() -> Doctor:
    return _autoencoder_accumulation(zero_each_micro_batch=False)


# -- GW203 / GW213: evaluation that is not deterministic -----------------------------------------


def _segmentation_net(dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(dropout),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1),
    )  # fmt: skip


def _pixel_accuracy(out: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((out > 0).float() == mask).float().mean())


def _validate_segmentation(eval_mode: bool) -> Doctor:
    x, m, xv, mv = _noisy_masks()
    model = _segmentation_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(
        model, optimizer, x, m, nn.BCEWithLogitsLoss(), steps=120, val=(xv, mv), eval_every=40,
        eval_mode=eval_mode, metric=_pixel_accuracy,
    )  # fmt: skip


_NO_EVAL = "https://github.com/wolny/pytorch-3dunet/issues/53"


@case(
    "ported-eval-forgotten",
    "GW203",
    "a segmentation network with BatchNorm and dropout is validated under torch.no_grad() "
    "without model.eval(); the reporter pointed out that the trainer never switches the model to "
    "eval mode before validation, which matters as soon as it has dropout or batch norm",
    source=_NO_EVAL,
)
def eval_forgotten() -> Doctor:
    return _validate_segmentation(eval_mode=False)


@case(
    "ported-eval-forgotten-fixed",
    None,
    "the same network validated after model.eval() (and trained after model.train())",
    source=_NO_EVAL,
)
def eval_forgotten_fixed() -> Doctor:
    return _validate_segmentation(eval_mode=True)


class _FunctionalDropoutNet(nn.Module):
    def __init__(self, follow_mode: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 10)
        self.follow_mode = follow_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        if not self.follow_mode:
            return self.fc2(F.dropout(x, p=0.5))  # the functional form ignores model.eval()
        return self.fc2(F.dropout(x, p=0.5, training=self.training))


def _functional_dropout(follow_mode: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _FunctionalDropoutNet(follow_mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_F_DROPOUT = "https://github.com/pytorch/pytorch/issues/11999"


@case(
    "ported-functional-dropout",
    "GW213",
    "forward() calls F.dropout(x, p) without training=self.training: dropout stays on after "
    "model.eval() and evaluation is random; the reporter found dropout still active in eval mode",
    source=_F_DROPOUT,
)
def functional_dropout() -> Doctor:
    return _functional_dropout(follow_mode=False)


@case(
    "ported-functional-dropout-fixed",
    None,
    "the same network calling F.dropout(x, p, training=self.training)",
    source=_F_DROPOUT,
)
def functional_dropout_fixed() -> Doctor:
    return _functional_dropout(follow_mode=True)


# -- GW211: samples mixed along the batch axis -----------------------------------------------------


class _RowLSTM(nn.Module):
    """The tutorial's RNN classifier: each image row is a time step."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=batch_first)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, 8, 8))  # [batch, sequence, features]
        return self.fc(out[:, -1, :])


def _row_lstm(batch_first: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _RowLSTM(batch_first)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_BATCH_FIRST = "https://github.com/yunjey/pytorch-tutorial/issues/196"


@case(
    "ported-lstm-not-batch-first",
    "GW211",
    "an nn.LSTM built without batch_first=True is fed [batch, sequence, features]: it runs along "
    "the batch and mixes the samples; the reporter's accuracy fell to about 11%",
    source=_BATCH_FIRST,
)
def lstm_not_batch_first() -> Doctor:
    return _row_lstm(batch_first=False)


@case(
    "ported-lstm-not-batch-first-fixed",
    None,
    "the same classifier with nn.LSTM(..., batch_first=True)",
    source=_BATCH_FIRST,
)
def lstm_not_batch_first_fixed() -> Doctor:
    return _row_lstm(batch_first=True)


def _dense_log_softmax(dim: int) -> Doctor:
    x, y, xv, yv = _digits(flat=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LogSoftmax(dim=dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return _fit(model, optimizer, x, y, nn.NLLLoss(), steps=150, val=(xv, yv))


_LOG_SOFTMAX_DIM = "https://github.com/MicrosoftDocs/pytorchfundamentals/issues/4"


@case(
    "ported-log-softmax-dim0",
    "GW211",
    "a dense network ends in nn.LogSoftmax(dim=0): each class's scores are normalised over the "
    "batch, so a sample's output depends on the others; the reporter asked why dim=0 and not "
    "dim=1",
    source=_LOG_SOFTMAX_DIM,
)
def log_softmax_dim0() -> Doctor:
    return _dense_log_softmax(dim=0)


@case(
    "ported-log-softmax-dim0-fixed",
    None,
    "the same network normalising each sample over its classes, nn.LogSoftmax(dim=1)",
    source=_LOG_SOFTMAX_DIM,
)
def log_softmax_dim0_fixed() -> Doctor:
    return _dense_log_softmax(dim=1)


# -- GW212: one BatchNorm's running statistics shared by several depths -------------------------


class _IterativeRefiner(nn.Module):
    """A block applied three times per forward pass (a recurrent refinement)."""

    def __init__(self, shared_norm: bool, iterations: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.fc = nn.Linear(64, 64)
        count = 1 if shared_norm else iterations
        self.bn = nn.ModuleList(nn.BatchNorm1d(64) for _ in range(count))
        self.head = nn.Linear(64, 10)
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        for i in range(self.iterations):
            h = F.relu(self.bn[min(i, len(self.bn) - 1)](self.fc(h))) + h
        return self.head(h)


def _iterative_refiner(shared_norm: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _IterativeRefiner(shared_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_SHARED_BN = "https://github.com/pytorch/pytorch/issues/1738"


@case(
    "ported-batchnorm-reused",
    "GW212",
    "one nn.BatchNorm1d is applied at every iteration of a block used three times per forward "
    "pass: its running statistics average three different distributions; the reporter found "
    "net.eval() performing much worse than net.train() on the same data",
    source=_SHARED_BN,
)
def batchnorm_reused() -> Doctor:
    return _iterative_refiner(shared_norm=True)


@case(
    "ported-batchnorm-reused-fixed",
    None,
    "the same block (one shared Linear) with a separate BatchNorm1d per iteration",
    source=_SHARED_BN,
)
def batchnorm_reused_fixed() -> Doctor:
    return _iterative_refiner(shared_norm=False)


# -- GW214: a Module's requires_grad attribute, which freezes nothing ---------------------------


class _SmallUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.outc = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inc(x)
        return self.outc(torch.cat([h, self.down(h)], dim=1))


def _adapt_without_output_layer(method: bool) -> Doctor:
    x, m, xv, mv = _noisy_masks()
    model = _SmallUNet()
    if method:
        model.outc.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        frozen = ["outc"]
    else:
        model.outc.requires_grad = False  # an attribute on the Module: its weights still train
        params, frozen = list(model.parameters()), None
    optimizer = torch.optim.Adam(params, lr=3e-3)
    return _fit(
        model, optimizer, x, m, nn.BCEWithLogitsLoss(), steps=120, val=(xv, mv), eval_every=40,
        metric=_pixel_accuracy, frozen_on_purpose=frozen,
    )  # fmt: skip


_REQUIRES_GRAD = "https://github.com/CSCYQJ/MICCAI23-ProtoContra-SFDA/issues/18"


@case(
    "ported-requires-grad-attribute",
    "GW214",
    "the output layer is 'frozen' with model.outc.requires_grad = False, an attribute on the "
    "nn.Module that freezes none of its parameters; the reporter compared the weights before "
    "and after adaptation and found the layer was not frozen",
    source=_REQUIRES_GRAD,
)
def requires_grad_attribute() -> Doctor:
    return _adapt_without_output_layer(method=False)


@case(
    "ported-requires-grad-attribute-fixed",
    None,
    "the output layer frozen with model.outc.requires_grad_(False), the optimizer given the "
    "trainable parameters, and the frozen layer declared to the Doctor (frozen_on_purpose)",
    source=_REQUIRES_GRAD,
)
def requires_grad_attribute_fixed() -> Doctor:
    return _adapt_without_output_layer(method=True)


# -- GW217 / GW207: trainable tensors the optimizer never sees -----------------------------------


class _SNLINet(nn.Module):
    """Hidden layers kept in a Python list: nn.Module does not register them."""

    def __init__(self, registered: bool, n_hid: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(64, n_hid)
        hids = [nn.Sequential(nn.Linear(n_hid, n_hid), nn.ReLU()) for _ in range(n_layers)]
        self.hids = nn.ModuleList(hids) if registered else hids
        self.classifier = nn.Linear(n_hid, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        for layer in self.hids:
            h = layer(h)
        return self.classifier(h)


def _layers_in_list(registered: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _SNLINet(registered)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_LIST_OF_LAYERS = "https://github.com/pytorch/pytorch/issues/715"


@case(
    "ported-layers-in-python-list",
    "GW217",
    "the hidden nn.Linear layers are kept in a plain Python list: they are missing from "
    "model.parameters(), so the optimizer never updates them although gradients reach them; "
    "the reporter saw only the classifier in the model's parameters",
    source=_LIST_OF_LAYERS,
)
def layers_in_python_list() -> Doctor:
    return _layers_in_list(registered=False)


@case(
    "ported-layers-in-python-list-fixed",
    None,
    "the same hidden layers wrapped in nn.ModuleList",
    source=_LIST_OF_LAYERS,
)
def layers_in_python_list_fixed() -> Doctor:
    return _layers_in_list(registered=True)


class _PeepholeLSTM(nn.Module):
    """An LSTM cell with peephole weights Wci, Wcf, Wco, run over the 8 rows of a digit."""

    def __init__(self, as_parameters: bool, hidden: int = 32) -> None:
        super().__init__()
        self.gates = nn.Linear(8 + hidden, 4 * hidden)
        self.head = nn.Linear(hidden, 10)
        self.hidden = hidden
        peepholes = [torch.zeros(1, hidden) for _ in range(3)]
        if as_parameters:
            self.Wci, self.Wcf, self.Wco = (nn.Parameter(p) for p in peepholes)
        else:  # plain tensors that require grad: not registered, never optimised
            self.Wci, self.Wcf, self.Wco = (p.requires_grad_() for p in peepholes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, 8, 8)
        h = c = rows.new_zeros(rows.shape[0], self.hidden)
        for t in range(8):
            i, f, g, o = self.gates(torch.cat([rows[:, t], h], dim=1)).chunk(4, dim=1)
            i, f = torch.sigmoid(i + self.Wci * c), torch.sigmoid(f + self.Wcf * c)
            c = f * c + i * torch.tanh(g)
            h = torch.sigmoid(o + self.Wco * c) * torch.tanh(c)
        return self.head(h)


def _peephole_lstm(as_parameters: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _PeepholeLSTM(as_parameters)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_PEEPHOLES = "https://github.com/automan000/Convolutional_LSTM_PyTorch/issues/17"


@case(
    "ported-peephole-tensors",
    "GW217",
    "an LSTM cell's peephole weights are plain tensors with requires_grad=True, not "
    "nn.Parameters: gradients reach them but Adam(model.parameters()) never updates them; the "
    "reporter asked why Wci, Wcf and Wco are Variables rather than nn.Parameters",
    source=_PEEPHOLES,
)
def peephole_tensors() -> Doctor:
    return _peephole_lstm(as_parameters=False)


@case(
    "ported-peephole-tensors-fixed",
    None,
    "the same cell with the peephole weights as nn.Parameter",
    source=_PEEPHOLES,
)
def peephole_tensors_fixed() -> Doctor:
    return _peephole_lstm(as_parameters=True)


class _MyNet(nn.Module):
    """The forum's 'Code_1': layer2 and layer3 are created inside forward()."""

    def __init__(self, in_init: bool) -> None:
        super().__init__()
        self.layer1 = nn.Conv2d(1, 16, 3)
        self.in_init = in_init
        if in_init:
            self.layer2, self.layer3 = nn.Conv2d(16, 32, 3), nn.Conv2d(32, 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.layer1(x))
        if not self.in_init:  # new, untrained layers at every call, after the optimizer exists
            self.layer2, self.layer3 = nn.Conv2d(16, 32, 3), nn.Conv2d(32, 10, 4)
        out = F.relu(self.layer2(out))
        return self.layer3(out).flatten(1)


def _layers_created_in_forward(in_init: bool) -> Doctor:
    x, y, xv, yv = _digits(flat=False)
    model = _MyNet(in_init)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_FORWARD_LAYERS = (
    "https://discuss.pytorch.org/t/can-i-instantiate-layers-in-forward-function/105054"
)


@case(
    "ported-layer-created-in-forward",
    "GW207",
    "two conv layers are assigned to self inside forward(): each call replaces them with fresh "
    "random layers that the optimizer, built before the first forward pass, does not hold; the "
    "reporter asked whether layers may be instantiated in forward()",
    source=_FORWARD_LAYERS,
)
def layer_created_in_forward() -> Doctor:
    return _layers_created_in_forward(in_init=False)


@case(
    "ported-layer-created-in-forward-fixed",
    None,
    "the same network with every layer created in __init__",
    source=_FORWARD_LAYERS,
)
def layer_created_in_forward_fixed() -> Doctor:
    return _layers_created_in_forward(in_init=True)


class _EncoderWithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def _param_groups(with_head: bool) -> Doctor:
    x, y, xv, yv = _digits()
    model = _EncoderWithHead()
    parameters = [{"params": model.encoder.parameters(), "lr": 1e-3}]
    if with_head:
        parameters.append({"params": model.fc.parameters(), "lr": 3e-3})
    optimizer = torch.optim.AdamW(parameters)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=150, val=(xv, yv))


_PARAM_GROUPS = "https://github.com/zjunlp/HVPNeT/issues/5"


@case(
    "ported-param-missing-from-optimizer",
    "GW207",
    "the optimizer is built from hand-made parameter groups and the classifier's group is never "
    "appended: the head keeps its random initial weights; the reporter found the crf and fc "
    "parameters missing from the optimizer",
    source=_PARAM_GROUPS,
)
def param_missing_from_optimizer() -> Doctor:
    return _param_groups(with_head=False)


@case(
    "ported-param-missing-from-optimizer-fixed",
    None,
    "the same parameter groups with the classifier's group appended",
    source=_PARAM_GROUPS,
)
def param_missing_from_optimizer_fixed() -> Doctor:
    return _param_groups(with_head=True)


# -- GW3xx: the dynamics go wrong ------------------------------------------------------------------


def _relu_mlp(lr: float) -> Doctor:
    x, y, xv, yv = _digits()
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=200, val=(xv, yv))


@case(
    "ported-dead-relu",
    "GW304",
    "a ReLU MLP trained with Adam at lr 0.1: large early updates push the hidden units negative "
    "for every input; the reporter found the stuck model's parameters almost all negative with "
    "zero gradients, and recommends a smaller learning rate",
    source=_FORUM_CE,
)
def dead_relu() -> Doctor:
    return _relu_mlp(lr=0.1)


@case(
    "ported-dead-relu-fixed",
    None,
    "the same MLP trained with Adam at lr 1e-3",
    source=_FORUM_CE,
)
def dead_relu_fixed() -> Doctor:
    return _relu_mlp(lr=1e-3)


class _CharRNN(nn.Module):
    """The char-RNN classification tutorial's cell: the hidden state is a linear function of
    (input, hidden), with no squashing non-linearity."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.i2o = nn.Linear(input_size + hidden_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, line: torch.Tensor) -> torch.Tensor:
        hidden = line.new_zeros(line.shape[0], self.hidden_size)
        for t in range(line.shape[1]):
            combined = torch.cat((line[:, t], hidden), 1)
            hidden = self.i2h(combined)
            output = self.i2o(combined)
        return self.softmax(output)


def _two_languages(n: int = 1400, length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot 'words' of ``length`` letters from a 10-letter alphabet; the two classes (languages)
    draw their letters from overlapping ranges, 0..6 and 3..9."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    letters = torch.randint(0, 7, (n, length), generator=g) + 3 * y[:, None]
    return F.one_hot(letters, 10).float(), y


def _char_rnn(clip: bool) -> Doctor:
    x, y = _two_languages()
    x, y, xv, yv = x[:1200], y[:1200], x[1200:], y[1200:]
    model = _CharRNN(10, 64, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    doctor = Doctor(model, optimizer, on_finding=None)
    criterion = nn.NLLLoss()
    for step, idx in _batches(len(x), 32, 120):
        optimizer.zero_grad()
        output = model(x[idx])
        loss = criterion(output, y[idx])
        loss.backward()
        doctor.step(loss, inputs=x[idx], outputs=output, targets=y[idx])
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 40 == 0:
            with torch.no_grad():
                out = model(xv)
                doctor.validate(loss=float(criterion(out, yv)), metric=_accuracy(out, yv))
    doctor.close()
    return doctor


_CHAR_RNN = "https://github.com/pytorch/pytorch/issues/2623"


@case(
    "ported-exploding-rnn",
    "GW302",
    "the char-RNN tutorial's linear recurrence over 30-letter words, SGD without gradient "
    "clipping: the gradient norm explodes and the loss turns NaN; the reporter, adapting the "
    "tutorial to a large data set, hit exploding gradients (the NaN loss of the forum thread "
    "they link) and clipped the gradient",
    source=_CHAR_RNN,
)
def exploding_rnn() -> Doctor:
    return _char_rnn(clip=False)


@case(
    "ported-exploding-rnn-fixed",
    None,
    "the same RNN with the gradient norm clipped to 1 before each step, the reporter's fix",
    source=_CHAR_RNN,
)
def exploding_rnn_fixed() -> Doctor:
    return _char_rnn(clip=True)


class _MnistNet(nn.Module):
    """pytorch/examples' MNIST network; fc1 takes the 8x8 digits' 2x2 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def _mnist_example(lr: float) -> Doctor:
    x, y, xv, yv = _digits(flat=False)
    model = _MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return _fit(model, optimizer, x, y, F.nll_loss, steps=100, val=(xv, yv), eval_every=25)


_SGD_NAN = "https://github.com/pytorch/examples/issues/736"


@case(
    "ported-sgd-lr-nan",
    "GW301",
    "pytorch/examples' MNIST script with Adadelta swapped for optim.SGD at the script's lr of 1.0: "
    "the reporter got NaN for every loss; the maintainers answered to lower the learning rate",
    source=_SGD_NAN,
)
def sgd_lr_nan() -> Doctor:
    return _mnist_example(lr=1.0)


@case(
    "ported-sgd-lr-nan-fixed",
    None,
    "the same script with optim.SGD at lr 0.1",
    source=_SGD_NAN,
)
def sgd_lr_nan_fixed() -> Doctor:
    return _mnist_example(lr=0.1)


def _linear_regression(lr: float) -> Doctor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, generator=g) * 10
    y = x + 3 * torch.randn(100, 1, generator=g)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.MSELoss()
    doctor = Doctor(model, optimizer, on_finding=None)
    for _ in range(100):  # full batch, as in the report
        y_pred = model(x)
        loss = criterion(y_pred, y)
        optimizer.zero_grad()
        loss.backward()
        doctor.step(loss, inputs=x, outputs=y_pred, targets=y)
        optimizer.step()
    doctor.close()
    return doctor


_LINEAR_DIVERGES = "https://github.com/pytorch/pytorch/issues/23142"


@case(
    "ported-linear-regression-diverges",
    "GW305",
    "a one-feature linear regression with inputs of scale 10 trained by SGD at lr 0.01: each "
    "step overshoots and the loss grows every epoch (36, 44, 53, ... in the report)",
    source=_LINEAR_DIVERGES,
)
def linear_regression_diverges() -> Doctor:
    return _linear_regression(lr=0.01)


@case(
    "ported-linear-regression-diverges-fixed",
    None,
    "the same regression with SGD at lr 0.001",
    source=_LINEAR_DIVERGES,
)
def linear_regression_diverges_fixed() -> Doctor:
    return _linear_regression(lr=0.001)


# -- GW404 / GW104: the data set is wrong ----------------------------------------------------------


def _shuffled_training_set(together: bool) -> Doctor:
    x, y, xv, yv = _digits()
    x, y = x[:512], y[:512]
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(x), generator=g)
    x = x[order]
    if together:
        y = y[order]  # without this line (the bug) the labels keep their old order
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _fit(model, optimizer, x, y, nn.CrossEntropyLoss(), steps=300, val=(xv, yv))


_SEPARATE_SHUFFLE = "https://github.com/DrexelChatbotGroup/DrexelChatbot/issues/15"


@case(
    "ported-labels-shuffled-separately",
    "GW404",
    "the training inputs are shuffled but their labels are not: the model memorises noise, the "
    "training loss falls and validation stays at chance; the reporter saw that the script "
    "randomizes the order of the x data but not the y data",
    source=_SEPARATE_SHUFFLE,
)
def labels_shuffled_separately() -> Doctor:
    return _shuffled_training_set(together=False)


@case(
    "ported-labels-shuffled-separately-fixed",
    None,
    "the same script applying one permutation to the inputs and the labels",
    source=_SEPARATE_SHUFFLE,
)
def labels_shuffled_separately_fixed() -> Doctor:
    return _shuffled_training_set(together=True)


def _random_over_sample(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """imbalanced-learn's RandomOverSampler: minority rows drawn with replacement up to a balance."""
    minority = torch.nonzero(y == 1).flatten()
    extra = minority[torch.randint(len(minority), ((y == 0).sum() - len(minority),), generator=g)]
    return torch.cat([x, x[extra]]), torch.cat([y, y[extra]])


def _oversampling(before_split: bool):
    from gradwise.doctor.preflight import check

    g = torch.Generator().manual_seed(0)
    x, y = _blobs(n=1500, classes=2)
    keep = (y == 0) | (torch.rand(len(y), generator=g) < 0.12)  # about 1 positive in 9
    x, y = x[keep], y[keep]

    def split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        order = torch.randperm(len(x), generator=g)
        cut = int(0.8 * len(x))
        return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]

    if before_split:
        x_train, y_train, x_val, y_val = split(*_random_over_sample(x, y, g))
    else:
        x_train, y_train, x_val, y_val = split(x, y)
        x_train, y_train = _random_over_sample(x_train, y_train, g)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    return check(model, (x_train, y_train), (x_val, y_val), overfit=False, lr_range=False)


_OVERSAMPLING = "https://github.com/scikit-learn-contrib/imbalanced-learn/issues/751"


@case(
    "ported-oversample-before-split",
    "GW104",
    "minority rows are duplicated (RandomOverSampler) on the whole data set before "
    "train_test_split: copies of the same rows land in training and validation; the reporter "
    "cites results on preterm birth prediction that were over-optimistic for this reason",
    source=_OVERSAMPLING,
)
def oversample_before_split():
    return _oversampling(before_split=True)


@case(
    "ported-oversample-before-split-fixed",
    None,
    "the same data split first, the training part alone oversampled",
    source=_OVERSAMPLING,
)
def oversample_before_split_fixed():
    return _oversampling(before_split=False)
