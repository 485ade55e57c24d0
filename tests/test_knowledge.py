"""The knowledge base: every entry parses, every technique the seed names has one, every example runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import pytest

from gradwise.knowledge import CATEGORIES, REQUIRED_SECTIONS, find, load_entries

# Every technique named in ../shared/seed/ml-dl-expertise.md, as a user would type it.
SEED_TERMS = {
    "frameworks": [
        "autograd", "dynamic computational graph", "nn.Module", "custom layers", "custom loss function",
        "custom optimizer", "DDP", "FSDP", "DeepSpeed", "torch.amp", "TorchScript", "ONNX", "TorchServe",
        "PyTorch Lightning", "gradient checkpointing", "activation offloading", "eager execution",
        "graph mode", "tf.function", "Keras Sequential API", "Keras Functional API",
        "Keras subclassing API", "GradientTape", "tf.data", "TensorFlow Serving", "TFLite",
        "tf.keras.mixed_precision", "MirroredStrategy", "TPUStrategy", "JAX", "jax.jit", "jax.grad",
        "jax.value_and_grad", "jax.vmap", "jax.pmap", "Flax", "Optax", "Haiku", "XLA",
        "framework comparison",
    ],
    "architectures": [
        "self-attention", "scaled dot-product attention", "multi-head attention", "positional encoding",
        "sinusoidal positional encoding", "learned positional embedding", "RoPE", "ALiBi",
        "feed-forward network", "SwiGLU", "GELU", "encoder-only", "BERT", "decoder-only", "GPT",
        "encoder-decoder", "T5", "Flash Attention", "linear attention", "sparse attention",
        "Vision Transformer", "Swin Transformer", "Perceiver", "convolution", "stride", "padding",
        "dilation", "depthwise separable convolution", "MobileNet", "grouped convolution", "ResNeXt",
        "VGG", "ResNet", "skip connection", "DenseNet", "EfficientNet", "SqueezeNet", "ConvNeXt",
        "max pooling", "average pooling", "global average pooling", "vanilla RNN", "LSTM", "GRU",
        "bidirectional RNN", "Bahdanau attention", "Luong attention", "state space model", "S4", "Mamba",
        "CLIP", "Diffusion Transformer", "Mixture of Experts", "Switch Transformer",
    ],
    "generative": [
        "GAN", "WGAN", "non-saturating GAN loss", "spectral normalization", "gradient penalty", "DCGAN",
        "StyleGAN", "BigGAN", "Progressive GAN", "VAE", "KL divergence", "reparameterization trick",
        "diffusion model", "DDPM", "DDIM", "latent diffusion", "autoregressive model", "teacher forcing",
        "PixelCNN",
    ],
    "training": [
        "SGD with momentum", "Adam", "AdamW", "Lion", "learning rate warmup", "cosine annealing",
        "step decay", "one-cycle policy", "dropout", "DropPath", "stochastic depth", "weight decay",
        "label smoothing", "mixup", "CutMix", "early stopping", "gradient accumulation",
        "gradient clipping", "mixed precision", "loss scaling", "bf16", "batch normalization",
        "layer normalization", "group normalization", "RMSNorm", "Xavier initialization",
        "He initialization", "cross-entropy", "binary cross-entropy", "focal loss", "MSE", "MAE",
        "Huber loss", "triplet loss", "NT-Xent", "InfoNCE", "contrastive learning",
    ],
    "tuning": [
        "learning rate", "learning rate finder", "batch size", "grid search", "random search",
        "Bayesian optimization", "Optuna", "Hyperopt", "population-based training", "Hyperband",
        "ASHA", "successive halving", "hyperparameter tuning best practices",
    ],
    "data": [
        "DataLoader", "num_workers", "pin_memory", "persistent_workers", "prefetching",
        "data augmentation", "random crop", "color jitter", "RandAugment", "back-translation",
        "synonym replacement", "random deletion", "time stretching", "pitch shifting",
        "noise injection", "class weighting", "oversampling", "SMOTE", "undersampling",
        "stratified sampling", "class imbalance",
    ],
    "evaluation": [
        "accuracy", "precision", "recall", "F1 score", "ROC-AUC", "PR-AUC", "RMSE", "R2 score", "MAPE",
        "FID", "Inception Score", "LPIPS", "perplexity", "BLEU", "ROUGE", "BERTScore",
        "overfitting a single batch", "gradient inspection", "activation statistics",
        "weight distribution", "loss not decreasing", "exploding loss", "overfitting", "underfitting",
    ],
    "distributed": [
        "data parallelism", "all-reduce", "NCCL", "ZeRO", "tensor parallelism", "pipeline parallelism",
        "expert parallelism", "gradient compression", "GPU utilization",
    ],
    "deployment": [
        "TensorRT", "quantization", "post-training quantization", "quantization-aware training",
        "dynamic quantization", "Triton Inference Server", "FastAPI", "ONNX Runtime", "BentoML",
        "batch inference", "A/B testing", "canary deployment", "model monitoring", "drift detection",
        "model versioning",
    ],
    "transfer": [
        "transfer learning", "pre-trained models", "full fine-tuning", "freezing layers",
        "discriminative learning rates", "PEFT", "LoRA", "prefix tuning", "adapter layers",
        "prompt tuning", "gradual unfreezing", "catastrophic forgetting", "domain adaptation",
    ],
    "mlops": [
        "experiment tracking", "Weights & Biases", "MLflow", "TensorBoard", "Neptune", "model registry",
        "reproducibility", "random seeds", "checkpointing",
    ],
}  # fmt: skip

ENTRIES = load_entries()
EXAMPLES = [(e.id, i, ex.framework) for e in ENTRIES.values() for i, ex in enumerate(e.examples)]
FRAMEWORK_MODULES = {"torch": "torch", "jax": "jax", "keras": "keras", "tensorflow": "tensorflow"}
REQUIRE_FRAMEWORKS = os.environ.get("GRADWISE_REQUIRE_FRAMEWORKS") == "1"  # set by `make test`


def test_every_entry_parses_and_has_every_section():
    assert len(ENTRIES) >= 100
    for entry in ENTRIES.values():
        assert entry.path.stem == entry.id, entry.path
        missing = [s for s in REQUIRED_SECTIONS if s not in entry.sections()]
        assert missing == [], (entry.id, missing)
        assert entry.examples and any(ex.framework == "torch" for ex in entry.examples), entry.id
        assert entry.category in CATEGORIES
        assert all(r in ENTRIES for r in entry.related), (entry.id, entry.related)


def test_every_recipe_snippet_in_an_entry_is_a_valid_recipe():
    """An entry's ```yaml blocks show gradwise settings: each must load as a Recipe."""
    import re

    import yaml

    from gradwise.recipe import Recipe

    snippets = [
        (entry.id, block)
        for entry in ENTRIES.values()
        for block in re.findall(r"```yaml\n(.*?)```", entry.path.read_text(), re.S)
    ]
    assert len(snippets) >= 10
    for entry_id, block in snippets:
        try:
            Recipe.parse(yaml.safe_load(block))
        except Exception as exc:
            pytest.fail(f"{entry_id}: {exc}")


def test_names_are_unambiguous():
    seen: dict[str, str] = {}
    for entry in ENTRIES.values():
        for name in (entry.id, entry.title, *entry.aliases):
            key = name.lower()
            assert seen.setdefault(key, entry.id) == entry.id, (name, seen[key], entry.id)


@pytest.mark.parametrize("term", [t for terms in SEED_TERMS.values() for t in terms])
def test_every_technique_the_seed_names_has_an_entry(term):
    assert find(term).id in ENTRIES


@pytest.mark.parametrize(
    ("entry_id", "index", "framework"), EXAMPLES, ids=[f"{e}-{i}-{f}" for e, i, f in EXAMPLES]
)
def test_example_runs(entry_id, index, framework):
    module = FRAMEWORK_MODULES[framework]
    if importlib.util.find_spec(module) is None:
        if REQUIRE_FRAMEWORKS:
            pytest.fail(f"{module} is not installed but GRADWISE_REQUIRE_FRAMEWORKS=1")
        pytest.skip(f"{module} is not installed (pip install 'gradwise[frameworks]')")
    code = ENTRIES[entry_id].examples[index].code
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"{entry_id}.md[example {index}]", "exec"), {"__name__": "__example__"})
