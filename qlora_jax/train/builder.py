"""From a config and a model to what trains: the model split into its trainable and frozen
parts, the optimizer and its state (offloaded when configured), and the jitted steps. The
trainer, scripts/quality.py and every bench build through `build`."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.io.loading import load_model
from qlora_jax.nn.model import CausalLM
from qlora_jax.nn.sharding import Layout
from qlora_jax.train.config import OptimConfig, TrainConfig
from qlora_jax.train.optimizer import HostState, init_optimizer, make_optimizer, offload, offload_sharding
from qlora_jax.train.step import make_eval_step, make_train_step, to_device_batch


@dataclasses.dataclass
class Trainable:
  """A model split for training (LoRA params, RNG state, frozen base), its optimizer state and
  its compiled steps. `train_step` advances the state in place."""

  graphdef: nnx.GraphDef
  eval_graphdef: nnx.GraphDef  # dropout off
  lora: nnx.State
  rng: nnx.State
  frozen: nnx.State
  opt_state: object
  optim: OptimConfig
  tx: object  # the Optimizer behind opt_state
  schedule: object  # its learning-rate schedule
  step: object  # make_train_step's function
  eval_step: object  # make_eval_step's function
  layout: Layout | None = None  # None: one device
  opt_sharding: object = None  # pinned-host shardings of an offloaded optimizer state
  opt_template: object = None  # the optimizer state's shapes as laid out on the devices
  host_embedding: np.ndarray | None = None  # the token embedding, when it lives in host memory

  def train_step(self, batch: dict) -> dict:
    """One optimizer update on `batch` (device arrays, [micro-batches, rows, T]); its metrics."""
    self.lora, self.rng, self.opt_state, metrics = self.step(
        self.lora, self.rng, self.opt_state, self.frozen, batch)
    return metrics

  def eval_loss(self, batch: dict):
    """(summed token loss, token count) of a device batch [rows, T], dropout off."""
    return self.eval_step(self.lora, self.rng, self.frozen, batch)

  def mean_loss(self, batches: list[dict]) -> float:
    """Mean token loss over device batches [rows, T], dropout off, read back once."""
    sums = [self.eval_loss(b) for b in batches]
    total, count = jax.device_get((sum(t for t, _ in sums), sum(c for _, c in sums)))
    return float(total) / max(int(count), 1)

  def model(self) -> CausalLM:
    """The model for inference (dropout off) with the current adapters (and, when the step
    keeps it in host memory, the embedding table back on the devices)."""
    model = nnx.merge(self.eval_graphdef, self.lora, self.rng, self.frozen)
    if self.host_embedding is not None:
      table = model.model.embed_tokens.weight
      table.set_value(jax.device_put(self.host_embedding, table.get_value().sharding))
    return model

  def put_batch(self, batch: dict, leading: int = 0) -> dict:
    """A host batch on the devices: split over data x fsdp, or whole on the one device. With
    the embedding in host memory its rows are looked up here, on the host, and sent as
    `inputs_embeds` (the trainer prepares batch N+1 while the device runs step N)."""
    if self.host_embedding is not None:
      batch = {**batch, "inputs_embeds": self.host_embedding[batch["input_ids"]]}
    return to_device_batch(batch) if self.layout is None else self.layout.put_batch(batch, leading)

  def checkpoint_state(self) -> dict:
    """What a checkpoint holds: an offloaded state in optax's own structure."""
    opt_state = self.opt_state.stacked() if isinstance(self.opt_state, HostState) else self.opt_state
    return {"lora": self.lora, "rng": self.rng, "opt_state": opt_state}

  def restore_template(self) -> dict:
    """checkpoint_state()'s structure with the device layout a checkpoint is restored into."""
    return {"lora": self.lora, "rng": self.rng, "opt_state": self.opt_template}

  def restore(self, state: dict) -> None:
    """Take a state restored into restore_template() (an offloaded one goes back to host memory)."""
    self.lora, self.rng = state["lora"], state["rng"]
    self.opt_state = state["opt_state"]
    if self.opt_sharding is not None:
      self.opt_state = offload(self.opt_state, self.opt_sharding, self.lora)


def build(model: CausalLM, optim: OptimConfig, layout: Layout | None = None, *,
          reuse: Trainable | None = None, host_embedding: bool = False) -> Trainable:
  """The Trainable of `model` (built in `layout`, or on the default device) under `optim`.

  reuse: a Trainable of a model of the same structure, optimizer and layout (another seed, say)
  whose optimizer and compiled steps this one shares instead of compiling its own.
  host_embedding: keep the token embedding table in host memory (the model must have an untied
  lm_head); the steps take its rows looked up by put_batch."""
  table = _take_embedding(model) if host_embedding else None
  model.train()
  graphdef, lora, rng, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  if reuse is not None and (reuse.graphdef, reuse.optim, reuse.layout) != (graphdef, optim, layout):
    raise ValueError("build(reuse=...) needs a Trainable of the same model structure, optimizer "
                     "config and layout")
  tx, schedule = (reuse.tx, reuse.schedule) if reuse else make_optimizer(optim)
  opt_state = init_optimizer(tx, lora, layout)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          opt_state)
  opt_sharding = offload_sharding(opt_state, layout) if optim.offload_optimizer else None
  if reuse is not None:
    step, eval_step = reuse.step, reuse.eval_step
  else:  # the layout the steps take and keep is the state's before any offload
    step = make_train_step(graphdef, tx, opt_sharding, layout, (lora, rng, opt_state, frozen))
    eval_step = make_eval_step(eval_graphdef, layout)
  if opt_sharding is not None:
    opt_state = offload(opt_state, opt_sharding, lora)
  return Trainable(graphdef=graphdef, eval_graphdef=eval_graphdef, lora=lora, rng=rng,
                   frozen=frozen, opt_state=opt_state, optim=optim, tx=tx, schedule=schedule,
                   step=step, eval_step=eval_step, layout=layout, opt_sharding=opt_sharding,
                   opt_template=template, host_embedding=table)


def _take_embedding(model: CausalLM) -> np.ndarray:
  """The embedding table as a host array; the model keeps an empty [0, D] stand-in."""
  if model.lm_head is None:
    raise ValueError("embedding=host needs an untied lm_head: this model ties its embeddings to "
                     "lm_head, which the loss reads on the device; use embedding=device")
  weight = model.model.embed_tokens.weight
  table = np.asarray(jax.device_get(weight.get_value()))
  placed = weight.get_value().sharding
  weight.set_value(jax.device_put(jnp.zeros((0, table.shape[1]), table.dtype), placed))
  return table


def build_from_folder(cfg: TrainConfig, folder: pathlib.Path, layout: Layout | None = None):
  """(Trainable, tokenizer) of the converted model in `folder`, set up as cfg says."""
  model, tokenizer = load_model(folder, jax.numpy.dtype(cfg.model.dtype), cfg.model_options(),
                                seed=cfg.loop.seed, layout=layout)
  return build(model, cfg.optim, layout, host_embedding=cfg.host_embedding(tied=model.lm_head is None)), tokenizer
