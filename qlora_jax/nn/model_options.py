"""How the model runs, as opposed to what it is (ModelConfig): compute dtype, quantization,
LoRA, recomputation, attention, the 4-bit matmul's backend and the layer scan."""

from __future__ import annotations

import dataclasses

from pallas_kernels.backends import DEFAULT, Backend, get_backend
from qlora_jax.format.quantization import QuantConfig
from qlora_jax.nn.attention import ATTENTION_IMPLEMENTATIONS
from qlora_jax.nn.families import LORA_TARGETS
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.qmatmul import check_backend
from qlora_jax.nn.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelOptions:
  """How the model runs, as opposed to what it is (ModelConfig)."""

  dtype: str = "bfloat16"  # compute dtype, and the dtype of the dense weights
  quant: QuantConfig = QuantConfig()
  lora: LoraConfig | None = None  # None: no adapters (inference on the base model)
  remat: str = "none"  # a REMAT_POLICIES key (nn/remat.py)
  attention: str = "auto"  # auto | xla | cudnn (jax.nn.dot_product_attention implementation)
  backend: Backend = get_backend(DEFAULT)  # the 4-bit matmul's backend (pallas_kernels.backends)
  scan_layers: bool = False  # one stacked layer scanned over depth: compile time flat in depth
  # Training runs the MLP (and its norm) over at most this many tokens at a time, each piece
  # recomputed in the backward pass on its own: the [tokens, intermediate] tensors of a layer's
  # backward then scale with the piece, not the batch. 0: the whole batch at once.
  mlp_chunk: int = 0
  # Tokens whose float32 logits exist at once in the chunked loss (0: by vocabulary size,
  # train/loss.loss_chunk); fewer: a smaller peak for more, smaller lm_head GEMMs.
  loss_chunk: int = 0
  # Layers per iteration of the layer scan: with 2, one layer's host copies (its offloaded
  # checkpoint coming back for the backward) can run beside the other's compute.
  scan_unroll: int = 1
  # Mixture of experts: the router's load-balancing loss (transformers' load_balancing_loss_func)
  # times this is added to the training loss; 0: off, as in the usual recipes.
  router_aux_loss: float = 0.0

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    check_backend(self.backend)
    if not (isinstance(self.mlp_chunk, int) and self.mlp_chunk >= 0):
      raise ValueError(f"mlp_chunk must be an int >= 0 (tokens; 0 = no chunking), got {self.mlp_chunk!r}")
    if not (isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
      raise ValueError(f"loss_chunk must be an int >= 0 (tokens; 0 = by vocabulary), got {self.loss_chunk!r}")
    if not (isinstance(self.scan_unroll, int) and self.scan_unroll >= 1):
      raise ValueError(f"scan_unroll must be an int >= 1 (layers per scan iteration), got {self.scan_unroll!r}")
    if not (isinstance(self.router_aux_loss, (int, float)) and 0 <= self.router_aux_loss < float("inf")):
      raise ValueError(f"router_aux_loss must be a number >= 0 (0: off), got {self.router_aux_loss!r}")
    unknown = set(self.lora.targets if self.lora else ()) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"unknown lora_targets {sorted(unknown)}; choose from {LORA_TARGETS}")
