"""The PyTorch side of the benchmarks, written the plain way FedFMS's code is.

The model is the official SAM with, for FedMSA, the upstream Medical SAM Adapter in every
encoder block (fedfms_jax_reference.fedfms.build_torch_fedfms, the parity tests' reference too):

    x = shortcut + Space_Adapter(attn(norm1(x)))                   serial, with skip
    x = x + mlp(norm2(x)) + 0.5 * MLP_Adapter(norm2(x))            parallel, no skip

with upstream's names (blocks.N.Space_Adapter.D_fc1 ...) so weights/convert.py carries the
same tensors into the Flax model. The federated round is FedFMS's: a sequential loop over
clients, each a full model copy with its own Adam, then FedAvg over the trained tensors of
the clients' state_dicts, copied back into the server model and every client.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


POS_WEIGHT = 2.0
LEARNING_RATE = 1e-4


def is_trainable(name: str, mode: str) -> bool:
    """FedSAM trains the image encoder and mask decoder, FedMSA the adapters and the mask
    decoder; the prompt encoder is always frozen."""
    if name.startswith("mask_decoder."):
        return True
    if mode == "fedsam":
        return name.startswith("image_encoder.")
    if mode == "fedmsa":
        return "_Adapter." in name
    raise ValueError(f"unknown training mode {mode!r}; known: fedsam, fedmsa")


def set_trainable(sam: nn.Module, mode: str) -> list[str]:
    """requires_grad by mode; returns the trainable parameters' names."""
    names = []
    for name, parameter in sam.named_parameters():
        parameter.requires_grad_(is_trainable(name, mode))
        if parameter.requires_grad:
            names.append(name)
    return names


def make_optimizer(sam: nn.Module) -> torch.optim.Optimizer:
    """FedFMS's Adam (lr 1e-4, torch defaults) over the trainable parameters."""
    return torch.optim.Adam([p for p in sam.parameters() if p.requires_grad], lr=LEARNING_RATE)


def segment(sam: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """FedFMS's prompt-free forward, batched: images [B, 3, S, S] -> logits [B, 1, L, L].

    The official modules with the decoder's predict_masks written out for a batch of
    images without prompts: the decoder sees only its output tokens, no dense prompt
    embedding is added, and mask token 0 is the output.
    """
    decoder = sam.mask_decoder
    embeddings = sam.image_encoder(images)
    b, c, h, w = embeddings.shape
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = tokens.unsqueeze(0).expand(b, -1, -1)
    pos = sam.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
    hs, src = decoder.transformer(embeddings, pos, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    mask_tokens = hs[:, 1:1 + decoder.num_mask_tokens]
    hyper_in = torch.stack([mlp(mask_tokens[:, i])
                            for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks[:, :1]


def loss_fn() -> nn.Module:
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT))


def train_step(sam: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               images: torch.Tensor, targets: torch.Tensor, autocast_dtype=None) -> float:
    """One FedFMS training step: forward, BCE, backward, Adam."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        logits = segment(sam, images)
    loss = criterion(logits.float(), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


class FedFMSRound:
    """FedFMS's federated loop: K full model copies trained one after another, then FedAvg
    through state_dicts.

    Every client holds a deep copy of the whole model (frozen weights included) and its own
    Adam, which persists across rounds. After local training the server averages the trained
    tensors of the clients' state_dicts with weights n_k / sum(n) and copies the result into
    the server model and back into every client.
    """

    def __init__(self, server_model: nn.Module, mode: str, num_clients: int,
                 autocast_dtype=None):
        self.server_model = server_model
        self.keys = set_trainable(server_model, mode)
        self.clients = [copy.deepcopy(server_model) for _ in range(num_clients)]
        self.optimizers = [make_optimizer(client) for client in self.clients]
        self.criterion = loss_fn()
        self.autocast_dtype = autocast_dtype

    def run_round(self, batches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                  num_samples: Sequence[float]) -> list[float]:
        """batches[k]: client k's (images, targets) steps; returns each client's last loss."""
        losses = []
        for client, optimizer, client_batches in zip(self.clients, self.optimizers, batches):
            client.train()
            for images, targets in client_batches:
                loss = train_step(client, optimizer, self.criterion, images, targets,
                                  self.autocast_dtype)
            losses.append(float(loss))
        self.communicate(num_samples)
        return losses

    @torch.no_grad()
    def communicate(self, num_samples: Sequence[float]) -> None:
        total = float(sum(num_samples))
        weights = [n / total for n in num_samples]
        server_state = copy.deepcopy(self.server_model.state_dict())
        client_states = [client.state_dict() for client in self.clients]
        for key in self.keys:
            average = torch.zeros_like(server_state[key], dtype=torch.float32)
            for weight, state in zip(weights, client_states):
                average += weight * state[key]
            server_state[key].copy_(average)
        self.server_model.load_state_dict(server_state)
        for client in self.clients:
            client.load_state_dict(server_state)


def num_trainable(sam: nn.Module) -> int:
    return sum(p.numel() for p in sam.parameters() if p.requires_grad)
