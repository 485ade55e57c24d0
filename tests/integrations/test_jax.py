"""gradwise.integrations.jax.Doctor in a plain JAX + Optax loop: a healthy run ends without a
warning, each planted fault gets its rule's code (the same faults as the PyTorch cases in
gradwise.doctor.cases), the doctor never compiles anything after its first steps and never
recompiles the user's train step, the run directory renders, and pytrees are grouped into layers.

One jitted train step per loss serves every test (the learning rate lives in the optimizer state,
through optax.inject_hyperparams), so the file compiles a handful of small programs in all.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from gradwise.doctor.report import report_run  # noqa: E402
from gradwise.errors import GradwiseWarning  # noqa: E402
from gradwise.integrations.jax import Doctor, layers  # noqa: E402

TX = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)


# -- a pure-JAX MLP with Flax Linen's parameter layout ------------------------------------------


def init_mlp(inputs: int, outputs: int, hidden: int = 64, depth: int = 2, seed: int = 0) -> dict:
    """He-initialised weights, made with NumPy (eager JAX ops would each compile a kernel)."""
    rng = np.random.default_rng(seed)
    sizes = [inputs] + [hidden] * depth + [outputs]
    params = {}
    for i in range(depth + 1):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        kernel = rng.standard_normal((fan_in, fan_out), np.float32) * np.sqrt(2.0 / fan_in)
        params[f"Dense_{i}"] = {"kernel": kernel, "bias": np.zeros(fan_out, np.float32)}
    return {"params": params}


def forward(variables: dict, x):
    p = variables["params"]
    h, hidden = x, []
    for i in range(len(p) - 1):
        h = jax.nn.relu(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
        hidden.append(h)
    last = p[f"Dense_{len(p) - 1}"]
    return h @ last["kernel"] + last["bias"], hidden


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def naive_cross_entropy(logits, y):  # log(softmax(x)): log(0) once a logit gap exceeds ~100
    return -jnp.take_along_axis(jnp.log(jax.nn.softmax(logits)), y[:, None], axis=1).mean()


def train_fn(loss_fn, params, opt_state, x, y):
    def objective(p):
        logits, hidden = forward(p, x)
        return loss_fn(logits, y), (logits, hidden)

    (loss, (logits, hidden)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, grads, updates, logits, hidden


@functools.cache
def train_step(loss_fn):
    return jax.jit(functools.partial(train_fn, loss_fn))


@jax.jit
def eval_loss(params, x, y):
    return cross_entropy(forward(params, x)[0], y)


@jax.jit
def optimizer_state(params, lr):
    state = TX.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return state


# -- data and the loop --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """Digits standardised with the training set's statistics: (x, y, x_val, y_val, raw x)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int32)
    mean, std = x[:1500].mean(0), x[:1500].std(0)
    z = (x - mean) / np.where(std > 0, std, 1.0)
    return z[:1500], y[:1500], z[1500:], y[1500:], x


def run(
    x,
    y,
    *,
    lr: float = 1e-3,
    steps: int = 300,
    hidden: int = 64,
    val=None,
    eval_every: int = 50,
    updates: bool = True,
    loss_fn=cross_entropy,
    step_fn=None,
    on_step=None,
    **doctor_kwargs,
) -> Doctor:
    """A plain JAX loop, as a user writes it, with the doctor fed after each step."""
    step_fn = step_fn or train_step(loss_fn)
    params = jax.device_put(init_mlp(x.shape[1], 10, hidden=hidden))
    opt_state = optimizer_state(params, lr)
    doctor = Doctor(on_finding=None, **doctor_kwargs)
    rng = np.random.default_rng(0)
    order, cursor, batch = rng.permutation(len(x)), 0, 32
    for step in range(steps):
        if cursor + batch > len(x):
            order, cursor = rng.permutation(len(x)), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        xb, yb = x[idx], y[idx]
        params, opt_state, loss, grads, upd, logits, hidden_out = step_fn(params, opt_state, xb, yb)
        doctor.step(
            loss,
            grads=grads,
            params=params,
            updates=upd if updates else None,
            inputs=xb,
            outputs=logits,
            targets=yb,
            activations={f"Dense_{i}": ("relu", h) for i, h in enumerate(hidden_out)},
            opt_state=opt_state,
        )
        if on_step is not None:
            on_step(step)
        if val is not None and (step + 1) % eval_every == 0:
            doctor.validate(loss=eval_loss(params, *val))
    doctor.close()
    return doctor


def codes(doctor: Doctor) -> set[str]:
    return {f.code for f in doctor.findings}


@pytest.fixture(scope="module")
def healthy(digits, tmp_path_factory):
    x, y, xv, yv, _ = digits
    run_dir = tmp_path_factory.mktemp("jax-run")
    return run(x, y, steps=300, val=(xv, yv), run_dir=run_dir), run_dir


# -- healthy ------------------------------------------------------------------------------------


def test_healthy_run_has_no_warning_or_error(healthy):
    doctor, _ = healthy
    serious = [f for f in doctor.findings if f.severity in ("warning", "error")]
    assert serious == [], doctor.summary()
    assert doctor.doctor.signals.loss_kind == "cross_entropy"  # inferred from the loss's value


def test_healthy_run_feeds_every_signal(healthy):
    t = healthy[0].telemetry()
    assert t["framework"] == "jax"
    assert [s for s, _ in t["loss"]] == list(range(300))  # every step's loss, read in batches
    assert len(t["grad_norm"]) == 300 and all(v > 0 for _, v in t["grad_norm"])
    assert t["layers"] == ["Dense_0", "Dense_1", "Dense_2"]  # natural order, "params" dropped
    assert [s for s, _ in t["update_ratio"]["Dense_0"]] == list(range(0, 300, 20))  # `updates`
    ratios = [v for _, v in t["update_ratio"]["Dense_2"]]
    assert all(1e-5 < r < 1e-1 for r in ratios), ratios  # Adam at 1e-3: ~1e-3 of the weights
    assert all(v > 0 for _, v in t["layer_grad_norm"]["Dense_1"])
    assert [lr for _, lr in t["lr"]] == pytest.approx([1e-3] * 15)  # from inject_hyperparams
    assert len(t["val"]) == 6 and t["val"][-1]["loss"] < t["val"][0]["loss"]
    assert set(t["activations"]) == {"Dense_0", "Dense_1"}


def test_run_directory_renders(healthy):
    _, run_dir = healthy
    assert (run_dir / "doctor" / "findings.json").is_file()
    html = report_run(run_dir).read_text()
    assert "Dense_1" in html and "jax" in html


# -- planted faults (the faults of gradwise.doctor.cases, in JAX) -------------------------------


def test_learning_rate_far_too_high(digits):
    x, y, _, _, _ = digits  # the PyTorch case GW305-lr-10x-too-high: Adam at lr 0.3 on an MLP
    doctor = run(x, y, lr=0.3, steps=200, updates=False)  # the update measured from the weights
    found = {f.code: f for f in doctor.findings}
    assert "GW305" in found and found["GW305"].severity == "error", doctor.summary()
    ratios = doctor.telemetry()["update_ratio"]["Dense_1"]
    assert [s for s, _ in ratios][:3] == [1, 20, 40]  # the first from the host snapshot at step 0
    assert ratios[0][1] > 0.1  # Adam at 0.3 moves the weights by a large part of their size


def test_nonfinite_loss(digits):
    x, y, _, _, _ = digits  # GW301-log-of-zero: a hand-written log(softmax) on large inputs
    doctor = run(x * 50, y, lr=0.5, steps=60, loss_fn=naive_cross_entropy)
    assert "GW301" in codes(doctor), doctor.summary()
    assert next(f for f in doctor.findings if f.code == "GW301").severity == "error"


def test_labels_out_of_range(digits):
    x, y, _, _, _ = digits  # labels 1..10 for 10 outputs: optax gives a NaN loss, no error
    doctor = run(x, y + 1, steps=20)
    found = {f.code: f for f in doctor.findings}
    assert "GW105" in found, doctor.summary()
    assert found["GW105"].evidence["max_target"] == 10
    assert found["GW105"].evidence["num_classes"] == 10


def test_unnormalised_inputs(digits):
    *_, raw = digits  # GW102-raw-pixels: digits as 0-255 pixels
    doctor = run(raw[:1500] * 16, digits[1], steps=20)
    assert "GW102" in codes(doctor), doctor.summary()


def test_overfitting(digits):
    x, y, xv, yv, _ = digits  # GW401-overfitting: a wide MLP memorises 200 noisy samples
    y = y[:200].copy()
    rng = np.random.default_rng(1)
    noisy = rng.random(200) < 0.3
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    doctor = run(x[:200], y, lr=3e-3, steps=300, val=(xv, yv), eval_every=25)
    assert "GW401" in codes(doctor), doctor.summary()


# -- no compilation caused by the doctor ---------------------------------------------------------


def test_the_doctor_never_recompiles(digits, healthy):
    x, y, xv, yv, _ = digits
    compiles: list[str] = []
    counting = [False]

    def listen(event: str, duration: float, **kwargs) -> None:
        if counting[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def watch(step: int) -> None:
        counting[0] = step >= 20  # the doctor's own functions compile at its first samples

    user_step = train_step(cross_entropy)  # compiled by the healthy run already
    cached = user_step._cache_size()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run(x, y, steps=90, val=(xv, yv), eval_every=30, updates=False, on_step=watch)
        run(x, y, steps=45, on_step=watch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert cached >= 1 and user_step._cache_size() == cached  # never traced or compiled again
    assert compiles == []  # sampled steps, the weights' copy, validate(): nothing new compiles


def test_donated_weights_and_state(digits):
    """A train step that donates the weights and the optimizer state (their buffers are gone
    after the next call): the doctor reads them before, from its own copies."""
    x, y, *_ = digits
    donating = jax.jit(functools.partial(train_fn, cross_entropy), donate_argnums=(0, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor = run(x, y, steps=45, updates=False, step_fn=donating)
    assert [str(w.message) for w in caught if w.category is GradwiseWarning] == []
    t = doctor.telemetry()
    assert [s for s, _ in t["update_ratio"]["Dense_0"]] == [1, 20, 40]
    assert [s for s, _ in t["lr"]] == [0, 20, 40]


# -- pytrees into layers ------------------------------------------------------------------------


def test_pytrees_are_grouped_into_layers():
    a, b = jnp.ones((2, 3)), jnp.ones(3)
    linen = {"params": {f"Dense_{i}": {"kernel": a, "bias": b} for i in (0, 1, 2, 10)}}
    assert list(layers(linen)) == ["Dense_0", "Dense_1", "Dense_2", "Dense_10"]
    assert [x.shape for x in layers(linen)["Dense_1"]] == [(3,), (2, 3)]
    assert list(layers({"params": {"kernel": a, "bias": b}})) == ["params"]  # one Dense
    assert list(layers([(a, b), (a, b)])) == ["0", "1"]
    assert list(layers(((a, b), {"w": a}, a))) == ["0", "1", "2"]
    assert list(layers({"w1": a, "b1": b})) == ["b1", "w1"]  # a flat dict: a layer per array
    tree = {"encoder": {"block": [{"w": a}, {"w": a, "step": jnp.int32(3)}]}, "head": {"w": a}}
    assert layers(tree) == {"encoder/block/0": [a], "encoder/block/1": [a], "head": [a]}


def test_flax_nnx_state_and_module():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

    model = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))  # shapes only: nothing to compile
    params = jax.tree_util.tree_map(
        lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), nnx.state(model, nnx.Param)
    )
    grouped = layers(params)  # the .value boxes are not layers
    assert list(grouped) == ["hidden", "norm", "out"]
    assert sorted(x.shape for x in grouped["hidden"]) == [(4, 8), (8,)]
    assert list(layers(model)) == ["hidden", "norm", "out"]  # the module: its nnx.Param state
    assert len(layers(nnx.state(model))["norm"]) == 4  # with the batch statistics
    doctor = Doctor(task="multiclass", on_finding=None, sample_every=1)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    for _ in range(2):
        doctor.step(jnp.float32(1.0), grads=grads, params=params)
    t = doctor.telemetry()
    assert t["layers"] == ["hidden", "norm", "out"] and t["grad_norm"][0][1] > 0
    assert set(t["update_ratio"]) == {"hidden", "norm", "out"}  # the step's update: zero here


# -- never raises into the loop ------------------------------------------------------------------


def test_a_failing_measurement_is_one_warning():
    doctor = Doctor(task="multiclass", on_finding=None)
    assert doctor.wants_batch and doctor.wants_activations  # the first steps are all watched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor.step(jnp.float32(1.0), grads={"w": "not an array"}, params={"w": jnp.ones(3)})
        doctor.step(jnp.float32(1.0), grads={"w": "not an array"}, opt_state=object())
    messages = [str(w.message) for w in caught if issubclass(w.category, GradwiseWarning)]
    assert len(messages) == 2, messages  # one per failing measurement, not one per step
    assert "the gradient norm failed" in messages[0]
    assert "the per-layer statistics failed" in messages[1]
    assert [s for s, _ in doctor.telemetry()["loss"]] == [0, 1]  # every loss kept
    assert doctor.doctor.signals.step == 2
    with pytest.raises(ValueError, match="run directory"):
        doctor.save()


def test_broadcast_loss_shapes_run_in_jax():
    """GW215 runs here (frameworks.NOT_CHECKED): jnp broadcasts (N, 1) against (N,) silently."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = x.sum(1)
    pred = x @ rng.standard_normal((4, 1)).astype(np.float32)  # (64, 1)
    found = {}
    for outputs in (jnp.asarray(pred), jnp.asarray(pred[:, 0])):
        doctor = Doctor(on_finding=None)
        loss = np.mean((np.asarray(outputs) - y) ** 2)  # the user's MSE, as jnp computes it
        doctor.step(loss, inputs=x, outputs=outputs, targets=jnp.asarray(y))
        found[outputs.ndim] = codes(doctor)
    assert "GW215" in found[2] and "GW215" not in found[1], found
