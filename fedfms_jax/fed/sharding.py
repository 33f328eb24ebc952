"""Clients across devices: a 1-D 'clients' mesh, padding to it, and chunking within it.

Per-client arrays (leading axis K_pad) are sharded over the mesh's 'clients' axis, so each
device trains K_pad / n of the clients; the frozen weights and the global weights are
replicated, so every device holds them once. K real clients are padded with zero-weight
padding clients to K_pad, a multiple of the chunk size C (`clients_per_step`), itself a
multiple of the device count n. When C < K_pad the clients train C at a time (a lax.scan over
K_pad / C chunks), so the activations of only C clients are alive at once.

The mesh uses Auto axis types: the per-client work is independent until the weighted sum
over clients (an all-reduce), which the partitioner places itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

CLIENTS = "clients"


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'clients' over `devices` (default: every visible device)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (CLIENTS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a per-client array: its leading axis split over 'clients'."""
    return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array every device holds whole (frozen and global weights)."""
    return NamedSharding(mesh, P())


def layout(num_clients: int, num_devices: int,
           clients_per_step: int | None = None) -> tuple[int, int]:
    """(K_pad, C): padded client count and clients trained at once.

    C is `clients_per_step` rounded up to a multiple of the device count (all clients at once
    when None); K_pad is K rounded up to a multiple of C.
    """
    if num_clients < 1:
        raise ValueError(f"a federation needs at least one client, got {num_clients}")
    if clients_per_step is not None and clients_per_step < 1:
        raise ValueError(f"clients_per_step must be >= 1, got {clients_per_step}")
    want = num_clients if clients_per_step is None else min(clients_per_step, num_clients)
    chunk = math.ceil(want / num_devices) * num_devices
    return math.ceil(num_clients / chunk) * chunk, chunk


def group_widths(chunk: int, num_devices: int) -> tuple[int, ...]:
    """The vmap widths a group of clients may take in one call: the chunk C and n, 2n, 4n...
    below it (n devices, each holding width / n of the group). A plan (clients.segment_plan)
    covers any number of clients with them; only fewer than n clients need padding."""
    return tuple(sorted({chunk} | {num_devices << i for i in range(chunk.bit_length())
                                   if num_devices << i < chunk}, reverse=True))


# device_put on the CPU aliases a host array aligned to this many bytes instead of copying it.
HOST_ALIGNMENT = 64


def host_zeros(shape: Sequence[int], dtype) -> np.ndarray:
    """Zeros on the host, aligned so that placing them on a CPU device copies nothing: a
    call's batches are written once, into one of these, and trained where they lie."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.zeros(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def pad_clients(tree, num_padded: int):
    """Pad every leaf's leading (client) axis with zeros to num_padded: [K, ...] -> [K_pad, ...]."""
    def pad(x):
        x = np.asarray(x)
        extra = num_padded - x.shape[0]
        if extra < 0:
            raise ValueError(f"{x.shape[0]} clients do not fit {num_padded} client slots")
        return x if extra == 0 else np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])
    return jax.tree.map(pad, tree)


def place_clients(tree, mesh: Mesh):
    """device_put a tree of per-client arrays [K_pad, ...] sharded over 'clients'."""
    return jax.device_put(tree, client_sharding(mesh))


def place_replicated(tree, mesh: Mesh):
    """device_put a tree replicated on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def constrain_clients(tree, mesh: Mesh | None):
    """Inside jit: keep per-client arrays [K_pad, ...] sharded over 'clients'."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, client_sharding(mesh))


def to_chunks(tree, chunk: int, mesh: Mesh | None = None):
    """[K_pad, ...] -> [K_pad / C, C, ...]: chunk j holds clients j, j + K_pad/C, j + 2K_pad/C...

    This order keeps each device's clients on that device: with the block layout of the
    'clients' sharding, the reshape [K_pad] -> [C, K_pad / C] splits the sharded axis into a
    sharded major part and a local minor part, and the swap of axes moves no data between
    devices.
    """
    def split(x):
        k = x.shape[0]
        return jnp.swapaxes(x.reshape(chunk, k // chunk, *x.shape[1:]), 0, 1)
    out = jax.tree.map(split, tree)
    if mesh is None:
        return out
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(None, CLIENTS)))


def from_chunks(tree):
    """Inverse of `to_chunks`: [K_pad / C, C, ...] -> [K_pad, ...]."""
    def merge(x):
        return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.tree.map(merge, tree)
