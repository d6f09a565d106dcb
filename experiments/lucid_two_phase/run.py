"""LUCID's two-phase synthetic task (the official `synthetic_phase2_extension` protocol).

One attention layer, one head, no positional encoding: token embedding (d_model 256)
-> q, k, v projections -> causal attention -> a linear head to one scalar per
position, trained with MSE. Each sequence is a random permutation of the 10 tokens
(seq_len = vocab = 10). Phase 1 regresses each token's own id (identity), which
drives softmax into a deep diagonal attention sink; phase 2 switches the target to
the running mean of the ids so far (cumsum / position) with the same optimiser
state. Adam(lr 1e-4), batch 64. The attention is `attnlab.ops.softmax_attention`
or `attnlab.ops.lucid_attention`; everything else is written out here.

Differences from the release, stated: LUCID's key RMS norm here has no learnable
gain (the release's `nn.RMSNorm` gain starts at 1 and is trained), and phase lengths
are set from the command line.

    python experiments/lucid_two_phase/run.py --phase1=30000 --phase2=30000 --seeds=42
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnlab import ops

HERE = os.path.dirname(os.path.abspath(__file__))


def init_params(key: jax.Array, vocab: int, d: int) -> dict[str, jax.Array]:
  """The release's init: embedding N(0, 0.02), Xavier-uniform projections, zero bias."""
  ke, kq, kk, kv, ko = jax.random.split(key, 5)

  def xavier(k, fan_in, fan_out):
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(k, (fan_in, fan_out), jnp.float32, -bound, bound)

  return {
    "embed": 0.02 * jax.random.normal(ke, (vocab, d), jnp.float32),
    "wq": xavier(kq, d, d),
    "wk": xavier(kk, d, d),
    "wv": xavier(kv, d, d),
    "wo": xavier(ko, d, 1),
    "bo": jnp.zeros((1,), jnp.float32),
  }


def forward(params, tokens: jax.Array, model: str):
  """tokens [B, T] -> (predictions [B, T], mean diagonal attention probability)."""
  h = params["embed"][tokens]  # [B, T, d]
  # One head: [B, T, 1, d].
  q, k, v = (jnp.einsum("btd,de->bte", h, params[w])[:, :, None] for w in ("wq", "wk", "wv"))
  if model == "softmax":
    y = ops.softmax_attention(q, k, v)
  else:
    # One solve block covers the whole (short) sequence; the default 64 would pad T=10.
    y = ops.lucid_attention(q, k, v, block_size=tokens.shape[1])
  out = jnp.einsum("btd,do->bto", y[:, :, 0], params["wo"])[..., 0] + params["bo"][0]
  # Both models put raw q·k/√d through the softmax, so the sink is measured alike.
  t = tokens.shape[1]
  logits = jnp.einsum("bqd,bkd->bqk", q[:, :, 0], k[:, :, 0]) * q.shape[-1] ** -0.5
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  diag = jnp.diagonal(jax.nn.softmax(logits, axis=-1), axis1=1, axis2=2).mean()
  return out, diag


def make_run(model: str, vocab: int, seq_len: int, batch: int, lr: float, chunk: int):
  """A jitted function advancing (params, opt_state, key) by `chunk` steps of one phase."""
  opt = optax.adam(lr)

  def loss_fn(params, tokens, phase):
    pred, diag = forward(params, tokens, model)
    ids = tokens.astype(jnp.float32)
    cumavg = jnp.cumsum(ids, axis=1) / jnp.arange(1, seq_len + 1, dtype=jnp.float32)
    target = jnp.where(phase == 1, ids, cumavg)
    return jnp.mean((pred - target) ** 2), diag

  def step(carry, _, phase):
    params, opt_state, key = carry
    key, sub = jax.random.split(key)
    # A random permutation of the vocabulary per sequence (seq_len == vocab here).
    tokens = jnp.argsort(jax.random.uniform(sub, (batch, vocab)), axis=1)[:, :seq_len]
    (loss, diag), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, phase)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, key), (loss, diag)

  @jax.jit
  def run_chunk(params, opt_state, key, phase):
    carry, (losses, diags) = jax.lax.scan(
      lambda c, x: step(c, x, phase), (params, opt_state, key), None, length=chunk
    )
    return carry, losses, diags

  return opt, run_chunk


def train(model: str, seed: int, phase1: int, phase2: int, chunk: int, args) -> dict:
  params = init_params(jax.random.key(seed), args.vocab, args.d_model)
  opt, run_chunk = make_run(model, args.vocab, args.seq_len, args.batch, args.lr, chunk)
  opt_state = opt.init(params)
  key = jax.random.key(seed + 1)
  history = {"loss": [], "diag": [], "phase": []}
  start = time.time()
  for phase, steps in ((1, phase1), (2, phase2)):
    for done in range(0, steps, chunk):
      (params, opt_state, key), losses, diags = run_chunk(params, opt_state, key, phase)
      history["loss"].extend(np.asarray(losses).tolist())
      history["diag"].extend(np.asarray(diags).tolist())
      history["phase"].extend([phase] * chunk)
      print(
        f"{model} seed={seed} phase={phase} step={done + chunk} loss={float(losses[-1]):.4f} "
        f"diag={float(diags[-1]):.4f} ({time.time() - start:.0f}s)",
        flush=True,
      )
  history["seconds"] = time.time() - start
  return history


def summarise(history: dict, phase1: int) -> dict:
  loss = np.asarray(history["loss"])
  diag = np.asarray(history["diag"])
  tail = max(1, min(1000, (len(loss) - phase1) // 10))
  return {
    "phase1_final_loss": float(loss[phase1 - tail : phase1].mean()),
    "phase1_final_diag_prob": float(diag[phase1 - tail : phase1].mean()),
    "phase2_first_loss": float(loss[phase1 : phase1 + 10].mean()),
    "phase2_final_loss": float(loss[-tail:].mean()),
    "phase2_final_diag_prob": float(diag[-tail:].mean()),
    "tail_steps_averaged": tail,
    "seconds": history["seconds"],
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--phase1", type=int, default=30000)
  p.add_argument("--phase2", type=int, default=30000)
  p.add_argument("--chunk", type=int, default=1000)
  p.add_argument("--seeds", default="42")
  p.add_argument("--models", default="softmax,lucid")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--seq_len", type=int, default=10)
  p.add_argument("--vocab", type=int, default=10)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  assert args.seq_len == args.vocab, "tokens are permutations of the vocabulary"
  os.makedirs(args.out, exist_ok=True)
  chunk = min(args.chunk, args.phase1, args.phase2)
  assert args.phase1 % chunk == 0 and args.phase2 % chunk == 0
  results = {"config": vars(args) | {"jax": jax.__version__}, "runs": {}}
  curves = {}
  for model in args.models.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      history = train(model, seed, args.phase1, args.phase2, chunk, args)
      results["runs"][f"{model}/seed{seed}"] = summarise(history, args.phase1)
      curves[f"{model}/seed{seed}"] = np.asarray(history["loss"], np.float32)
      curves[f"{model}/seed{seed}/diag"] = np.asarray(history["diag"], np.float32)
  tag = f"p1_{args.phase1}_p2_{args.phase2}"
  with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(curves, args.phase1, os.path.join(args.out, f"{tag}.png"), args)
  print(json.dumps(results["runs"], indent=1))


def plot(curves: dict, phase1: int, path: str, args) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_diag) = plt.subplots(1, 2, figsize=(11, 3.8))
  colours = {"softmax": "tab:blue", "lucid": "tab:red"}
  for name, values in curves.items():
    model = name.split("/")[0]
    window = 50
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax = ax_diag if name.endswith("/diag") else ax_loss
    label = name.removesuffix("/diag")
    ax.plot(np.arange(len(smooth)) + window, smooth, color=colours[model], lw=0.8, label=label)
  for ax in (ax_loss, ax_diag):
    ax.axvline(phase1, color="k", ls="--", lw=0.7)
    ax.set_xlabel("step (dashed: identity -> cumulative average)")
  ax_loss.set_yscale("log")
  ax_loss.set_ylabel("MSE (50-step mean)")
  ax_loss.legend(fontsize=7)
  ax_diag.set_ylabel("mean diagonal attention prob")
  fig.suptitle(
    f"LUCID two-phase task: single head, d {args.d_model}, T = vocab = {args.seq_len}, NoPE, "
    f"Adam {args.lr:g}, batch {args.batch}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
