"""Building and compiling test models cheaply on small CPUs.

Eager initialisation compiles one program per parameter shape, and XLA's CPU fusion emitters
and optimisation passes dominate a compilation; none of that is what the tests check.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedfms_jax.models import Sam, SamConfig


# jax.jit(..., compiler_options=FAST_COMPILE): about 3x faster to compile a SAM gradient.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def random_sam(config: SamConfig, seed: int = 0, scale: float = 0.1) -> Sam:
    """Every variable (parameters and buffers) drawn from N(0, scale^2)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(state):
        shape = variable.get_value().shape
        variable.set_value(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32))
    return nnx.merge(graphdef, state)
