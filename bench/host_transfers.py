"""How fast do the offloaded AdamW moments of a 65B step cross PCIe, and in what arrangement?

Part 1, 6.4 GB (80 pieces of 80 MB, a 65B layer's float32 moments each): host -> device and
device -> host through the runtime (jax.device_put), both directions at once, each direction and
both as copies inside one XLA scan, runtime transfers issued behind a 0.44 s matmul program, and
in-scan copies beside that scan's matmuls (does XLA overlap them? it did not: issue 6's notes).
Part 2, the whole update (80 layers of 10 M parameters, bf16 LoRA): chunks of 4/8/16 layers
streamed with runtime transfers (the trainer's way) against a scan with in-program copies.
Prints median seconds; docs/BENCHMARKS.md ("Streamed update") has the H100 figures.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 bench/host_transfers.py
"""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from bench.common import median_seconds  # noqa: E402

LAYERS, PER = 80, 10_000_000
PIECE = (2, PER // 1024, 1024)  # 80 MB of float32: one layer's mu and nu


def transfers(host, device) -> dict:
  hosts = [jax.device_put(jnp.ones(PIECE, jnp.float32), host) for _ in range(LAYERS)]
  devices = [jnp.full(PIECE, 2.0, jnp.float32) for _ in range(LAYERS)]
  fetch = lambda: [jax.device_put(h, device) for h in hosts]  # noqa: E731
  write = lambda: [jax.device_put(d, host) for d in devices]  # noqa: E731
  stacked = jax.device_put(jnp.ones((LAYERS, *PIECE), jnp.float32), host)
  scan_fetch = jax.jit(lambda m: jax.lax.scan(
      lambda c, i: (c + jax.device_put(m[i], device)[0, 0, 0], None), 0.0, jnp.arange(LAYERS))[0])
  scan_write = jax.jit(lambda x: jax.lax.scan(
      lambda c, i: (c, jax.device_put(x * i.astype(jnp.float32), host)), 0.0, jnp.arange(LAYERS))[1],
      out_shardings=host)
  w, x = jnp.full((12, 8192, 8192), 1e-3, jnp.bfloat16), jnp.ones((2048, 8192), jnp.bfloat16)
  matmuls = jax.jit(lambda x, w: jax.lax.scan(lambda x, _: (_twelve(x, w), None), x, None, length=LAYERS)[0])

  def scan_copies(x, w, m, compute: bool):
    """Per iteration: (twelve matmuls,) fetch the next piece, write the current one back."""
    def body(carry, i):
      x, cur = carry
      ahead = jax.device_put(m[jnp.minimum(i + 1, LAYERS - 1)], device)
      return ((_twelve(x, w) if compute else x), ahead), jax.device_put(cur * 0.9 + 0.1, host)
    return jax.lax.scan(body, (x, jax.device_put(m[0], device)), jnp.arange(LAYERS))[1]
  copies = jax.jit(lambda x, w, m: scan_copies(x, w, m, False), out_shardings=host)
  both = jax.jit(lambda x, w, m: scan_copies(x, w, m, True), out_shardings=host)
  return {
      "host->device (runtime)": median_seconds(lambda: jax.block_until_ready(fetch())),
      "device->host (runtime)": median_seconds(lambda: jax.block_until_ready(write())),
      "both at once (runtime)": median_seconds(lambda: jax.block_until_ready((fetch(), write()))),
      "host->device (in-program scan)": median_seconds(lambda: jax.block_until_ready(scan_fetch(stacked))),
      "device->host (in-program scan)": median_seconds(lambda: jax.block_until_ready(scan_write(devices[0]))),
      "matmuls alone": median_seconds(lambda: jax.block_until_ready(matmuls(x, w))),
      "matmuls, then host->device behind them": median_seconds(lambda: jax.block_until_ready((matmuls(x, w), fetch()))),
      "both directions (in-program scan)": median_seconds(lambda: jax.block_until_ready(copies(x, w, stacked))),
      "matmuls + both directions (in-program scan)": median_seconds(lambda: jax.block_until_ready(both(x, w, stacked))),
  }


def _twelve(x, w):
  for k in range(12):
    x = jnp.dot(x, w[k], preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  return x


def _adam(m, g, p):
  """A stand-in AdamW step on one slice: (new p, new [mu, nu])."""
  mu, nu = 0.9 * m[0] + 0.1 * g, 0.999 * m[1] + 0.001 * g * g
  return p - 1e-4 * mu / (jnp.sqrt(nu) + 1e-8), jnp.stack([mu, nu])


def _lora_grads():
  return jnp.ones((LAYERS, PER), jnp.bfloat16), jnp.full((LAYERS, PER), 1e-3, jnp.bfloat16)


def chunked_update(host, device, chunk: int) -> float:
  lora, grads = _lora_grads()
  n = LAYERS // chunk
  moments = [jax.device_put(jnp.zeros((2, chunk, PER), jnp.float32), host) for _ in range(n)]

  def one(lora, g, m, c):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk).astype(jnp.float32)  # noqa: E731
    p, new = _adam(m, take(g), take(lora))
    return jax.lax.dynamic_update_slice_in_dim(lora, p.astype(lora.dtype), c * chunk, 0), new

  program = jax.jit(one, donate_argnums=(0,))
  state = {"lora": lora, "m": moments}

  def run():
    lora, m, out = state["lora"], state["m"], []
    ahead = [jax.device_put(x, device) for x in m[:2]]
    for c in range(n):
      if c + 2 < n:
        ahead.append(jax.device_put(m[c + 2], device))
      lora, new = program(lora, grads, ahead[c], c)
      ahead[c] = None
      out.append(jax.device_put(new, host))
    jax.block_until_ready((lora, out))
    state["lora"], state["m"] = lora, out
  return median_seconds(run)


def scan_update(host, device) -> float:
  lora, grads = _lora_grads()
  moments = jax.device_put(jnp.zeros((LAYERS, 2, PER), jnp.float32), host)

  def update(lora, g, m):
    def body(carry, i):
      lora, cur = carry
      p, new = _adam(cur, g[i].astype(jnp.float32), lora[i].astype(jnp.float32))
      ahead = jax.device_put(m[jnp.minimum(i + 1, LAYERS - 1)], device)
      return (lora.at[i].set(p.astype(lora.dtype)), ahead), jax.device_put(new, host)
    (lora, _), out = jax.lax.scan(body, (lora, jax.device_put(m[0], device)), jnp.arange(LAYERS))
    return lora, out

  program = jax.jit(update, donate_argnums=(0,), out_shardings=(None, host))
  state = {"lora": lora, "m": moments}

  def run():
    state["lora"], state["m"] = program(state["lora"], grads, state["m"])
    jax.block_until_ready((state["lora"], state["m"]))
  return median_seconds(run)


def main() -> None:
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  device = host.with_memory_kind("device")
  results = transfers(host, device)
  for chunk in (4, 8, 16):
    results[f"update, chunks of {chunk} layers (runtime transfers)"] = chunked_update(host, device, chunk)
  results["update, scan with in-program copies"] = scan_update(host, device)
  for name, seconds in results.items():
    print(f"{name:48} {seconds:.3f} s", flush=True)


if __name__ == "__main__":
  main()
