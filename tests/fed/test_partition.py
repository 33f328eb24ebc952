"""fed/partition.py: what each training mode trains, the paper's counts, and a training step
that moves exactly the trainable leaves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedfms_jax.fed.partition import (DEFAULT_LORA_RANK, MODES, FlatLayout, breakdown,
                                      config_for_mode, num_bytes, num_params, split,
                                      trainable_filter)
from fedfms_jax.inspect import abstract_sam
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models.adapters import AdapterParam
from fedfms_jax.models.image_encoder import Block
from fedfms_jax.models import get_config
from fedfms_jax.weights_file import flat_arrays
from tests.fast_build import FAST_COMPILE, random_sam

GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def paths(state) -> set[str]:
    return set(flat_arrays(state))


def flat(state) -> dict[str, np.ndarray]:
    return {path: np.asarray(v) for path, v in flat_arrays(state).items()}


# ------------------------------------------------------------------------------- counts

def test_paper_counts_vit_b():
    plain = abstract_sam(get_config("vit_b"))
    msa = abstract_sam(get_config("vit_b", adapter="msa"))
    assert num_params(nnx.state(plain, nnx.Param)) == 93_735_472
    assert num_params(nnx.state(msa, nnx.Param)) == 100_836_400
    assert num_params(split(plain, "fedsam")[1]) == 93_729_252
    _, fedmsa, _ = split(msa, "fedmsa")
    assert num_params(fedmsa) == 11_159_268
    assert num_bytes(fedmsa) == 4 * 11_159_268
    assert num_bytes(fedmsa, itemsize=2) == 2 * 11_159_268
    assert num_params(split(plain, "decoder")[1]) == 4_058_340


def test_lora_counts():
    """Rank r on the qkv of the chosen blocks: r * (D + 3D) each, trained with the decoder."""
    config = get_config("tiny", lora_rank=3, lora_blocks=(1,))
    model = abstract_sam(config)
    decoder = num_params(split(model, "decoder")[1])
    assert num_params(split(model, "fedlora")[1]) == decoder + 3 * (64 + 3 * 64)
    everywhere = abstract_sam(config_for_mode(get_config("tiny"), "fedlora"))
    assert num_params(split(everywhere, "fedlora")[1]) == decoder + 2 * 4 * (64 + 3 * 64)


def test_vit_l_adapters():
    """2 adapters of hidden width 256 in each of ViT-L's 24 blocks (one block traced: the
    whole ViT-L takes long to trace and adds nothing here)."""
    config = get_config("vit_l", adapter="msa")
    block = nnx.eval_shape(lambda: Block(
        config.embed_dim, config.num_heads, config.mlp_ratio, config.window_size, (64, 64),
        dtype=jnp.float32, rngs=nnx.Rngs(0), adapter_hidden_dim=config.adapter_hidden_dim))
    assert config.depth * num_params(nnx.state(block, AdapterParam)) == 25_227_264


@pytest.mark.parametrize("mode", MODES)
def test_class_head_always_trained_gaussian_never(mode):
    model = abstract_sam(config_for_mode(get_config("tiny", num_classes=2), mode))
    _, trainable, frozen = split(model, mode)
    assert {"class_head.kernel", "class_head.bias"} <= paths(trainable)
    assert GAUSSIAN in paths(frozen)
    assert not any(p.startswith("prompt_encoder.") for p in paths(trainable))
    assert num_params(trainable) > 0


def test_config_for_mode_adds_only_what_the_mode_needs():
    base = get_config("tiny", num_classes=3)
    assert config_for_mode(base, "fedmsa") == base.replace(adapter="msa")
    assert config_for_mode(base, "fedlora") == base.replace(lora_rank=DEFAULT_LORA_RANK)
    assert config_for_mode(base, "fedsam") == base == config_for_mode(base, "decoder")
    ranked = base.replace(lora_rank=8, lora_blocks=(0,))
    assert config_for_mode(ranked, "fedlora") == ranked


def test_bad_mode_names_the_culprit():
    model = abstract_sam(get_config("tiny"))
    message = "unknown training mode 'fedavg'; known: fedsam, fedmsa, fedlora, decoder"
    for call in (lambda: split(model, "fedavg"), lambda: trainable_filter("fedavg"),
                 lambda: config_for_mode(get_config("tiny"), "fedavg")):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="mode 'fedmsa' trains AdapterParams but the model "
                                         "has none; build it with adapter='msa'"):
        split(model, "fedmsa")
    with pytest.raises(ValueError, match="mode 'fedlora' trains LoRAParams .* lora_rank > 0"):
        split(model, "fedlora")


def test_breakdown_adds_up():
    model = abstract_sam(get_config("vit_b", adapter="msa"))
    rows = {name: (total, train) for name, total, train in breakdown(model, "fedmsa")}
    assert sum(t for t, _ in rows.values()) == 100_836_400
    assert sum(t for _, t in rows.values()) == 11_159_268
    assert rows["image_encoder.blocks.*.space_adapter"] == (3_550_464, 3_550_464)
    assert rows["image_encoder.blocks.*.attn"][1] == 0
    assert rows["image_encoder.pos_embed"] == (64 * 64 * 768, 0)
    assert GAUSSIAN.rsplit(".", 1)[0] not in rows  # a buffer, not a parameter


# ----------------------------------------------------------------------- a training step

# Adapters and LoRA in both encoder blocks and a 2-class head, so that every mode has
# something to train; one decoder layer keeps the four compilations short.
STEP_CONFIG = get_config("tiny", adapter="msa", lora_rank=2, num_classes=2, decoder_depth=1)
# Trained in every mode but never read by FedFMS's loss (segment uses no IoU prediction),
# so its gradient is exactly zero and Adam leaves it where it was.
UNUSED_BY_LOSS = "mask_decoder.iou_prediction_head."


def loss_cannot_move(path: str) -> bool:
    """Trainable leaves a step may leave in place: the unused IoU head, and the decoder's key
    biases, whose gradient is zero but for rounding (a key bias shifts all of a query's
    logits alike, which softmax ignores)."""
    return path.startswith(UNUSED_BY_LOSS) or path.endswith("k_proj.bias")


def expected_trainable(mode: str, path: str) -> bool:
    """The modes' definitions, written out by path, independently of partition's filters."""
    heads = path.startswith(("mask_decoder.", "class_head."))
    return heads or {
        "fedsam": path.startswith("image_encoder."),
        "fedmsa": ".space_adapter." in path or ".mlp_adapter." in path,
        "fedlora": ".qkv_lora." in path,
        "decoder": False,
    }[mode]


@pytest.fixture(scope="module")
def step_model():
    return random_sam(STEP_CONFIG, seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_training_step_moves_exactly_the_trainable_leaves(step_model, mode):
    graphdef, trainable, frozen = split(step_model, mode)
    before = flat(nnx.state(step_model))
    assert paths(trainable) == {p for p in before if expected_trainable(mode, p)}
    assert paths(trainable) | paths(frozen) == set(before)

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(trainable)
    # Frozen weights are not in the optimizer state: Adam holds mu and nu of the trainable
    # leaves only (plus its step count).
    assert num_params(opt_state) == 2 * num_params(trainable) + 1

    def loss_fn(trainable, frozen, images, targets):
        model = nnx.merge(graphdef, trainable, frozen)
        return weighted_bce(model.segment(images), targets)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(trainable, opt_state, frozen, images, targets):
        grads = jax.grad(loss_fn)(trainable, frozen, images, targets)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, grads

    rng = np.random.default_rng(1)
    images = rng.uniform(size=(2, 128, 128, 3)).astype(np.float32)
    targets = (rng.uniform(size=(2, 32, 32, 2)) > 0.7).astype(np.float32)
    new_trainable, _, grads = step(trainable, opt_state, frozen, images, targets)

    after = flat(nnx.state(nnx.merge(graphdef, new_trainable, frozen)))
    assert set(after) == set(before)
    for path in paths(frozen):
        assert after[path].dtype == before[path].dtype
        assert np.array_equal(after[path], before[path]), f"{mode}: frozen {path} moved"
    changed = {p for p in before if not np.array_equal(after[p], before[p])}
    assert changed <= paths(trainable)
    missed = paths(trainable) - changed - {p for p in paths(trainable) if loss_cannot_move(p)}
    assert not missed, f"{mode}: trainable leaves the step did not move: {sorted(missed)}"
    grads = flat(grads)
    unused = {p for p in paths(trainable) if p.startswith(UNUSED_BY_LOSS)}
    assert unused and not any(np.any(grads[p]) for p in unused) and not unused & changed


# ------------------------------------------------------------------ the raveled weights

def test_flat_layout_ravels_in_tree_order_and_round_trips():
    """A client's weights as one vector: the leaves in jax.tree order (so a draw of N values
    cut into leaves is the same draw, aggregate.gaussian_noise), batched or not, numpy kept
    numpy; an optimizer's state of the tree and of the vector convert both ways."""
    tree = {"b": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "a": np.array([10.0, 11.0], np.float32)}
    layout = FlatLayout.of(tree)
    assert layout.size == 8
    vector = layout.ravel(tree)
    assert isinstance(vector, np.ndarray)
    np.testing.assert_array_equal(
        vector, np.concatenate([x.ravel() for x in jax.tree.leaves(tree)]))
    np.testing.assert_array_equal(vector[:2], [10.0, 11.0])  # "a" before "b"
    jax.tree.map(np.testing.assert_array_equal, layout.unravel(vector), tree)
    stacked = jax.tree.map(lambda x: np.stack([x, -x]), tree)
    rows = layout.ravel(stacked, batch_dims=1)
    np.testing.assert_array_equal(rows, np.stack([vector, -vector]))
    jax.tree.map(np.testing.assert_array_equal, layout.unravel(rows), stacked)
    jitted = jax.jit(layout.unravel)(jnp.asarray(vector))
    jax.tree.map(np.testing.assert_array_equal, jitted, tree)

    tx = optax.adam(1e-3)
    state_of_tree = jax.tree.map(np.asarray, tx.init(tree))
    state_of_vector = layout.ravel_state(state_of_tree)
    assert jax.tree.structure(state_of_vector) == jax.tree.structure(tx.init(vector))
    back = layout.unravel_state(state_of_vector)
    assert jax.tree.structure(back) == jax.tree.structure(state_of_tree)
    with pytest.raises(ValueError, match="8 values, got shape"):
        layout.unravel(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        FlatLayout.of({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float16)})
