"""From a valid config to the run's objects: the sites' records, the starting model, the
client plan and the federation. No training, no files written; `fedfms_jax.config.validate`
has checked the config before any of these is called.
"""

from __future__ import annotations

import logging
import zlib

import ml_collections
from flax import nnx

from fedfms_jax.config import ALGORITHMS, ConfigError, fed_config, label_map
from fedfms_jax.data import load_sites
from fedfms_jax.data.preprocessing import DEFAULT_PERCENTILES, Preprocessing
from fedfms_jax.data.records import DEFAULT_KEEP_EMPTY, Site, keep_empty_slices
from fedfms_jax.fed.clients import ClientPlan, client_steps, plan_clients
from fedfms_jax.fed.partition import config_for_mode
from fedfms_jax.fed.round import Federation
from fedfms_jax.models import Sam, get_config
from fedfms_jax.models.sam import extend
from fedfms_jax.weights_file import load_sam

log = logging.getLogger(__name__)


def build_model(config: ml_collections.ConfigDict) -> Sam:
    """The starting model: the weights file (plus whatever the mode adds: adapters, LoRA, a
    class head, initialised from the seed) or, without one, a randomly initialised variant."""
    m = config.model
    settings = dict(dtype=m.dtype, num_classes=m.num_classes, adapter_ratio=m.adapter_ratio,
                    adapter_scale=m.adapter_scale, adapter_init=m.adapter_init,
                    lora_alpha=m.lora_alpha)
    rngs = nnx.Rngs(params=config.seed)
    if not m.weights:
        base_config = get_config(m.variant, **settings, lora_rank=m.lora_rank
                                 if config.mode == "fedlora" else 0)
        model = Sam(config_for_mode(base_config, config.mode), rngs=rngs)
    else:
        base = load_sam(m.weights, dtype=m.dtype)
        target = base.config.replace(**{k: v for k, v in settings.items() if k != "dtype"})
        if config.mode == "fedlora" and base.config.lora_rank == 0:
            target = target.replace(lora_rank=m.lora_rank)
        target = config_for_mode(target, config.mode)
        model = base if target == base.config else extend(base, target, rngs=rngs)
    model.set_remat("off" if m.remat == "auto" else m.remat)  # auto: see federation()
    return model


# Layouts read by nifti.read_site, whose keep_empty the engine applies to training only.
VOLUME_LAYOUTS = ("volumes", "nifti")


def load_data(config: ml_collections.ConfigDict) -> dict[str, Site]:
    """The sites. Volume layouts are read with every slice; `keep_empty` then thins the
    empty slices of the training sites' training records only, so validation and test
    volumes are scored whole."""
    d = config.data
    options = d.options.to_dict()
    seed = options.pop("seed", config.seed)  # a data seed of its own, e.g. for pretraining
    keep_empty = None
    if d.layout in VOLUME_LAYOUTS:
        keep_empty = options.pop("keep_empty", DEFAULT_KEEP_EMPTY)
        options["keep_empty"] = 1.0
    sites = load_sites(d.layout, d.root or None, sites=d.sites or None, skip_bad=d.skip_bad,
                       num_classes=config.model.num_classes, label_map=label_map(d.label_map),
                       val_fraction=d.val_fraction, seed=seed, **options)
    if d.unseen_site and d.unseen_site not in sites:
        raise ConfigError(f"data.unseen_site={d.unseen_site!r} is not a site; sites: "
                          f"{', '.join(sites)}")
    if keep_empty is not None:
        for name, site in sites.items():
            if name != d.unseen_site:  # the unseen site is only tested, on whole volumes
                # crc32, not hash(): the readers' per-site seed, so the draw is theirs.
                site.train = keep_empty_slices(site.train, keep_empty,
                                               [seed, zlib.crc32(name.encode())])
    return sites


def preprocessing_for(config: ml_collections.ConfigDict, model_config) -> Preprocessing:
    """What the network of this run sees (written into final.safetensors)."""
    d, o = config.data, config.data.options
    labels = label_map(d.label_map)
    window = o.get("window", None)
    return Preprocessing(
        image_size=model_config.image_size, low_res_size=model_config.low_res_size,
        normalise=d.normalise, resize=d.resize, prompt=d.prompt,
        num_classes=model_config.num_classes, class_head=model_config.num_classes > 1,
        label_map=None if labels is None else tuple(sorted(labels.items())),
        percentiles=tuple(float(v) for v in o.get("percentiles", DEFAULT_PERCENTILES)),
        window=None if window is None else tuple(float(v) for v in window),
        slab=int(o.get("slab", 3)), modality=o.get("modality", None))


def plan(config: ml_collections.ConfigDict, site_samples: dict[str, int]) -> ClientPlan:
    """The config's clients over sites with these training-sample counts."""
    held_out = [config.data.unseen_site] if config.data.unseen_site else []
    return plan_clients(site_samples, ALGORITHMS[config.algorithm], held_out)


def federation(config: ml_collections.ConfigDict, model: Sam, client_plan: ClientPlan, *,
               mesh=None, client_ids=None, example_batch=None) -> Federation:
    """The engine for the config's clients (client_ids: see Federation).

    With `example_batch` (one client's training batch, [B, ...] fields) the clients trained
    at once (train.clients_per_step=0) and the encoder's rematerialisation (model.remat=auto)
    are chosen so that a segment of local steps fits in the memory free now (fed.fit); the
    choice is logged and kept in `federation.layout`. Without it (evaluation only) nothing is
    compiled: all clients at once, no rematerialisation."""
    fed = fed_config(config)
    names, remat = client_plan.names, config.model.remat
    if example_batch is None:
        model.set_remat("off" if remat == "auto" else remat)
        return Federation(model, fed, len(names), mesh=mesh, client_names=names,
                          client_ids=client_ids)
    steps = client_steps(client_plan.num_samples, config.data.batch_size,
                         local_steps=fed.local_steps, local_epochs=fed.local_epochs)
    federation = Federation.fitted(model, fed, len(names), example_batch=example_batch,
                                   steps=steps, segment=config.train.steps_per_segment,
                                   remat=remat, mesh=mesh, client_names=names,
                                   client_ids=client_ids)
    log.info("%s", federation.layout.describe())
    return federation


def image_size(config: ml_collections.ConfigDict, model: Sam) -> int:
    size = config.data.image_size or model.config.image_size
    if size != model.config.image_size:
        raise ConfigError(f"data.image_size={size} but the model takes "
                          f"{model.config.image_size}")
    return size
