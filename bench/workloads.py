"""The benchmark workloads, each set up for both frameworks on the same weights and inputs.

Every setup returns a `Pair`: a zero-argument callable per framework that runs the workload
once and returns when it is finished, the FLOPs of one run (XLA's cost analysis of the JAX
program, used for both: the frameworks compute the same function), the images one run
processes and JAX's tracing + compilation time, measured apart from the runs.

The Flax model gets its weights from the PyTorch one through weights/convert.py, so both
compute the same function on the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from bench import torch_reference as ref
from bench.timing import timed
from fedfms_jax.fed.partition import split
from fedfms_jax.losses import weighted_bce
from fedfms_jax.models import Sam, SamConfig, get_config
from fedfms_jax.models.sam import normalise_pixels
from fedfms_jax.weights_file import sam_from_tensors
from fedfms_jax_reference.fedfms import build_torch_fedfms
from fedfms_jax_reference.sam import state_dict_numpy
from weights.convert import torch_to_flax

DTYPES = {"f32": ("float32", None), "bf16": ("bfloat16", torch.bfloat16)}


@dataclasses.dataclass
class Env:
    """Where and how the workloads run: device ('cpu' | 'gpu') and compute dtype."""

    device: str = "cpu"
    dtype: str = "f32"

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.device == "gpu" else "cpu")

    @property
    def jax_dtype(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def autocast(self):
        """torch autocast dtype (None: plain float32): the mixed precision JAX's
        config.dtype gives, float32 weights and lower-precision compute."""
        return DTYPES[self.dtype][1]

    def sync(self) -> None:
        if self.device == "gpu":
            torch.cuda.synchronize()


@dataclasses.dataclass
class Pair:
    """One workload in both frameworks."""

    name: str
    jax_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    flops: float                  # per run, from XLA's cost analysis of the JAX program
    images: int                   # images processed per run
    compile_s: float              # JAX trace + lower + compile
    info: dict


def model_config(variant: str, mode: str | None) -> SamConfig:
    """The variant's config with the adapters when the mode trains them."""
    config = get_config(variant)
    return config.replace(adapter="msa") if mode == "fedmsa" else config


def build_models(config: SamConfig, env: Env, seed: int = 0) -> tuple[torch.nn.Module, Sam]:
    """(official PyTorch model, Flax model with the same weights)."""
    torch_model = build_torch_fedfms(config, seed)
    tensors, _ = torch_to_flax(state_dict_numpy(torch_model), config.variant,
                               report=lambda *_: None)
    sam = sam_from_tensors(config.replace(dtype=env.jax_dtype), tensors,
                           "converted benchmark weights")
    return torch_model.to(env.torch_device), sam


def random_batch(config: SamConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images f32[B, S, S, 3] ~ N(0, 1), binary targets f32[B, L, L, 1])."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, config.image_size, config.image_size, 3), np.float32)
    targets = (rng.random((batch, config.low_res_size, config.low_res_size, 1)) < 0.3)
    return images, targets.astype(np.float32)


def random_pixels(config: SamConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What the engine's training streams give it: (pixels u8[B, S, S, 3], binary targets
    u8[B, L, L, 1]); `normalise_pixels` makes the model input of both frameworks."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch, config.image_size, config.image_size, 3), np.uint8)
    targets = rng.random((batch, config.low_res_size, config.low_res_size, 1)) < 0.3
    return pixels, targets.astype(np.uint8)


def to_torch(x: np.ndarray, env: Env) -> torch.Tensor:
    """NHWC numpy -> NCHW torch tensor on the device."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(env.torch_device)


def compile_jitted(jitted, *args) -> tuple[Callable, float, float]:
    """(compiled executable, FLOPs from XLA's cost analysis, seconds to trace + compile)."""
    compiled, seconds = timed(lambda: jitted.lower(*args).compile())
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return compiled, float(cost.get("flops", 0.0)) if cost else 0.0, seconds


# ------------------------------------------------------------------------------- roof

def matmul(n: int, env: Env) -> Pair:
    """A large float32 matrix product: each framework's practical roof on this machine."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    compiled, _, seconds = compile_jitted(jax.jit(jnp.matmul), ja, jb)
    ta, tb = torch.from_numpy(a).to(env.torch_device), torch.from_numpy(b).to(env.torch_device)

    def torch_fn():
        out = ta @ tb
        env.sync()
        return out

    return Pair(f"matmul {n}x{n} f32", lambda: compiled(ja, jb).block_until_ready(), torch_fn,
                2.0 * n ** 3, 0, seconds, {"n": n})


# ---------------------------------------------------------------------------- encoder

def encoder_forward(variant: str, batch: int, env: Env) -> Pair:
    """The image encoder's forward (inference) on a batch of images."""
    config = model_config(variant, None)
    torch_model, sam = build_models(config, env)
    images, _ = random_batch(config, batch, seed=1)
    graphdef, state = nnx.split(sam.image_encoder)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jnp.asarray(images)
    compiled, flops, seconds = compile_jitted(forward, state, x)
    encoder = torch_model.image_encoder.eval()
    tx = to_torch(images, env)

    @torch.inference_mode()
    def torch_fn():
        with torch.autocast(env.torch_device.type, dtype=env.autocast,
                            enabled=env.autocast is not None):
            out = encoder(tx)
        env.sync()
        return out

    return Pair(f"encoder {variant} fwd", lambda: compiled(state, x).block_until_ready(),
                torch_fn, flops, batch, seconds,
                {"variant": variant, "batch": batch, "image_size": config.image_size})


# ------------------------------------------------------------------------- train step

def jax_train_step(sam: Sam, mode: str):
    """(jitted step, trainable, opt_state, frozen): one FedFMS step (weighted BCE of the
    prompt-free segment forward, its gradient, Adam) donating the state it replaces."""
    graphdef, trainable, frozen = split(sam, mode)
    tx = optax.adam(ref.LEARNING_RATE)

    def loss_fn(trainable, frozen, images, targets):
        model = nnx.merge(graphdef, trainable, frozen)
        return weighted_bce(model.segment(images), targets, ref.POS_WEIGHT)

    def step(trainable, opt_state, frozen, images, targets):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, targets)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), trainable, tx.init(trainable), frozen


def train_step(variant: str, mode: str, batch: int, env: Env) -> Pair:
    """One training step (loss, backward, Adam) in a FedFMS mode."""
    config = model_config(variant, mode)
    torch_model, sam = build_models(config, env)
    images, targets = random_batch(config, batch, seed=2)
    step, trainable, opt_state, frozen = jax_train_step(sam, mode)
    x, y = jnp.asarray(images), jnp.asarray(targets)
    compiled, flops, seconds = compile_jitted(step, trainable, opt_state, frozen, x, y)
    carry = [trainable, opt_state]

    def jax_fn():
        trainable, opt_state, loss = compiled(*carry, frozen, x, y)
        carry[:] = [trainable, opt_state]
        return jax.block_until_ready((trainable, opt_state, loss))

    ref.set_trainable(torch_model, mode)
    torch_model.train()
    optimizer = ref.make_optimizer(torch_model)
    criterion = ref.loss_fn().to(env.torch_device)
    tx, ty = to_torch(images, env), to_torch(targets, env)

    def torch_fn():
        loss = ref.train_step(torch_model, optimizer, criterion, tx, ty, env.autocast)
        env.sync()
        return loss

    return Pair(f"train step {mode} {variant}", jax_fn, torch_fn, flops, batch, seconds,
                {"variant": variant, "mode": mode, "batch": batch,
                 "trainable_params": ref.num_trainable(torch_model)})


# ------------------------------------------------------------------------------ round

def client_data(config: SamConfig, num_clients: int, steps: int, batch: int, seed: int = 3):
    """Every client's batches for one round: (images [K, S, B, S, S, 3], targets
    [K, S, B, L, L, 1]) and unequal client sizes n_k (FedAvg weights)."""
    images, targets = random_batch(config, num_clients * steps * batch, seed)
    shape = (num_clients, steps, batch)
    num_samples = [float(100 + 37 * k) for k in range(num_clients)]
    return (images.reshape(*shape, *images.shape[1:]),
            targets.reshape(*shape, *targets.shape[1:]), num_samples)


def jax_federation(sam: Sam, mode: str, num_clients: int, steps: int, example_batch=None):
    """The engine's vmapped round (fedfms_jax.fed.round) for `steps` local steps: all
    clients at once, or, given one client's batch, the layout `train` would choose for it
    (clients at once and rematerialisation that fit the free memory, fed.fit)."""
    from fedfms_jax.fed.round import FedConfig, Federation

    config = FedConfig(mode=mode, local_steps=steps, local_epochs=None,
                       learning_rate=ref.LEARNING_RATE, pos_weight=ref.POS_WEIGHT)
    if example_batch is None:
        return Federation(sam, config, num_clients)
    return Federation.fitted(sam, config, num_clients, example_batch=example_batch,
                             steps=[steps] * num_clients, segment=steps)


def fed_round(variant: str, mode: str, num_clients: int, steps: int, batch: int,
              env: Env) -> Pair:
    """One federated round: K clients x S local steps of batch B, then FedAvg."""
    config = model_config(variant, mode)
    torch_model, sam = build_models(config, env)
    images, targets, num_samples = client_data(config, num_clients, steps, batch)
    batches = {"image": images, "mask_low_res": targets}
    # train's default layout (fed.fit), as the memory cases run it.
    federation = jax_federation(sam, mode, num_clients, steps,
                                {k: v[0, 0] for k, v in batches.items()})
    mask = np.ones((num_clients, steps), bool)
    state = [federation.init()]

    def jax_fn():
        state[0], result = federation.run_round(state[0], batches, mask, num_samples,
                                                sample=False)
        return jax.block_until_ready(state[0])

    # The first round compiles; time it apart, as the other workloads' compilation.
    _, seconds = timed(jax_fn)
    fedfms = ref.FedFMSRound(torch_model, mode, num_clients, env.autocast)
    torch_batches = [[(to_torch(images[k, s], env), to_torch(targets[k, s], env))
                      for s in range(steps)] for k in range(num_clients)]

    def torch_fn():
        out = fedfms.run_round(torch_batches, num_samples)
        env.sync()
        return out

    return Pair(f"round {mode} {variant} K={num_clients}", jax_fn, torch_fn, 0.0,
                num_clients * steps * batch, seconds,
                {"variant": variant, "mode": mode, "clients": num_clients, "steps": steps,
                 "batch": batch, "clients_per_step": federation.layout.clients_per_step})


# ---------------------------------------------------------------------- FedFMS protocol

# FedFMS's multi-site prostate data: training slices of BIDMC, HK, I2CVB, ISBI, ISBI_1.5, UCL.
PROSTATE_SLICES = (261, 158, 468, 421, 384, 175)


def fedfms_protocol(variant: str, mode: str, batch: int, env: Env, scale: int = 16) -> Pair:
    """FedFMS's round in small: 6 clients sized as the prostate sites' slice counts / scale,
    one local epoch each (ceil(n_k / B) steps, so unequal counts), FedAvg weighted by n_k;
    the engine's planned round (no masked steps) against FedFMS's sequential loop. The
    engine draws each round's batches as its streams give them (u8 pixels and targets,
    normalised on the device); the loop gets the same values as float tensors, made once."""
    from fedfms_jax.fed.clients import Segment, client_steps, masked_work, step_mask
    from fedfms_jax.fed.round import FedConfig, Federation

    config = model_config(variant, mode)
    torch_model, sam = build_models(config, env)
    num_samples = [max(1, n // scale) for n in PROSTATE_SLICES]
    steps = client_steps(num_samples, batch, local_steps=None, local_epochs=1)
    k, longest = len(steps), int(steps.max())
    pixels, targets = random_pixels(config, k * longest * batch, seed=4)
    shape = (k, longest, batch)
    pixels = pixels.reshape(*shape, *pixels.shape[1:])
    targets = targets.reshape(*shape, *targets.shape[1:])
    batches = {"pixels": pixels, "mask_low_res": targets}
    federation = Federation.fitted(sam, FedConfig(mode=mode, local_epochs=1,
                                                  learning_rate=ref.LEARNING_RATE,
                                                  pos_weight=ref.POS_WEIGHT), k,
                                   example_batch={name: v[0, 0] for name, v in batches.items()},
                                   steps=steps, segment=longest)
    mask = step_mask(steps, longest)
    weights = [float(n) for n in num_samples]
    state = [federation.init()]

    def jax_fn():
        state[0], _ = federation.run_round(state[0], batches, mask, weights, sample=False)
        return jax.block_until_ready(state[0])

    _, seconds = timed(jax_fn)
    fedfms = ref.FedFMSRound(torch_model, mode, k, env.autocast)
    images = normalise_pixels(pixels, federation.config.local.normalise)
    torch_batches = [[(to_torch(images[c, s], env),
                       to_torch(targets[c, s].astype(np.float32), env))
                      for s in range(steps[c])] for c in range(k)]

    def torch_fn():
        out = fedfms.run_round(torch_batches, weights)
        env.sync()
        return out

    plan = federation.plan(steps, longest)
    return Pair(f"fedfms round {mode} {variant} K={k}", jax_fn, torch_fn, 0.0,
                int(steps.sum()) * batch, seconds,
                {"variant": variant, "mode": mode, "clients": k, "batch": batch,
                 "num_samples": num_samples, "steps": steps.tolist(),
                 "masked_work": masked_work(plan, steps),
                 "masked_work_longest": masked_work(
                     [Segment(0, longest, tuple(range(k)), k)], steps),
                 "calls": len(plan), "clients_per_step": federation.layout.clients_per_step})


# ------------------------------------------------------------------- decoder-mode cache

def decoder_rounds(variant: str, batch: int, per_site: int = 24) -> tuple[dict, dict]:
    """Decoder mode's round through the whole training path (synthetic sites, the grain
    streams, the engine), with the embedding cache and without: ({name: round fn},
    {name: first round's seconds, compile and cache fill})."""
    from fedfms_jax.config import base_config
    from fedfms_jax.experiment import Experiment

    fns, first = {}, {}
    for name, cache in (("cached", "auto"), ("uncached", "off")):
        c = base_config()
        c.mode, c.rounds = "decoder", 100
        c.model.variant, c.model.weights = variant, ""
        c.data.layout, c.data.batch_size, c.data.num_threads = "synthetic", batch, 1
        c.data.options.num_sites, c.data.options.per_site = 2, per_site
        c.data.options.image_size = get_config(variant).image_size
        c.train.embedding_cache = cache
        experiment = Experiment(c)
        state = [experiment.init_state()]

        def run_round(experiment=experiment, state=state):
            state[0], _ = experiment.train_round(state[0])
            return jax.block_until_ready(state[0])

        _, first[name] = timed(run_round)
        fns[name] = run_round
    return fns, first
