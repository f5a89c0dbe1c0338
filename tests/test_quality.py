"""scripts/quality.py (and its quality_parts.py, quality_report.py) on a tiny random Llama: bases,
weight error, perplexity, fine-tuning, report; and the committed report re-rendered byte for byte."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.data import Tokenized
from qlora_jax.format.quantization import QuantConfig, dequantize, quantize
from qlora_jax.io.convert import convert
from qlora_jax.io.loading import expected_tensors
from qlora_jax.nn.families import LINEAR_NAMES
from qlora_jax.nn.lora import LoraConfig
from qlora_jax.nn.model import ModelOptions
from qlora_jax.nn.model_config import ModelConfig
from qlora_jax.train import builder
from qlora_jax.train.config_files import load_config
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scripts_quality", ROOT / "scripts" / "quality.py")
quality = sys.modules["scripts_quality"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)
import quality_parts as parts  # noqa: E402  (quality.py put scripts/ on sys.path)
import quality_report as report  # noqa: E402

NF4_DQ = QuantConfig()
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(converted NF4 folder, float32 reference tensors) of a random 2-layer Llama."""
  src = tmp_path_factory.mktemp("quality") / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(TINY))
  rng, tensors = np.random.default_rng(5), {}
  for name, (_, shape) in expected_tensors(ModelConfig.from_hf(TINY)).items():
    # Unit norms, N(0, 1 / hidden) embeddings and N(0, 1 / fan-in) linears: logits of order 1.
    w = rng.standard_normal(shape, np.float32) / math.sqrt(shape[-1])
    tensors[name] = np.ones(shape, np.float32) if "norm" in name else w
  save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
  convert(str(src), src.parent / "nf4", progress=False)
  return src.parent / "nf4", parts.reference_tensors(str(src))


def _windows(n=6, length=33, seed=0):
  return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (n, length)).astype(np.int32)


def test_dense_base_computes_what_the_4bit_base_computes(tiny):
  """The bf16 path is the quantized path minus quantization: on the dequantized weights it gives
  the same losses; on the reference weights it differs."""
  folder, tensors = tiny
  options = ModelOptions(scan_layers=True)
  roundtrip = {k: np.asarray(dequantize(quantize(jnp.asarray(v)), jnp.float32)) if parts.is_linear(k) else v
               for k, v in tensors.items()}
  models = [parts.base_model(folder, w, q, options) for w, q in
            ((tensors, NF4_DQ), (roundtrip, None), (tensors, None))]
  nll_4bit, nll_dense_rt, nll_dense = (parts.window_nll(m, _windows()) for m in models)
  np.testing.assert_allclose(nll_dense_rt, nll_4bit, rtol=1e-6)
  assert nll_dense.shape == (6,) and np.all(np.isfinite(nll_dense))
  assert math.log(TINY["vocab_size"]) < nll_dense.mean() < math.log(TINY["vocab_size"]) + 3  # random model
  logits_4bit, logits_rt, logits_dense = (np.asarray(m(jnp.asarray(_windows()))) for m in models)
  same, quant_error = np.abs(logits_rt - logits_4bit).max(), np.abs(logits_dense - logits_4bit).max()
  assert same < 1e-6 and quant_error > 1e-2, (same, quant_error)


def test_window_nll_matches_full_logits(tiny):
  folder, tensors = tiny
  model = parts.base_model(folder, tensors, None, ModelOptions(scan_layers=False))
  ids = _windows(n=2)
  logits = model(jnp.asarray(ids))[:, :-1]
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  expected = -np.take_along_axis(np.asarray(lp), ids[:, 1:, None], axis=-1)[..., 0].mean(axis=1)
  np.testing.assert_allclose(parts.window_nll(model, ids, batch=1), expected, rtol=2e-3)


def test_weight_error_orders_formats_on_gaussian_weights():
  gauss = parts.gaussian_control(576 * 256)
  err = {q: parts.weight_error([gauss], q) for q in parts.QUANTS}
  by = {parts.quant_name(q): e for q, e in err.items()}
  assert by["NF4"]["relative_mse"] < by["INT4"]["relative_mse"] < by["FP4"]["relative_mse"]
  assert 0.007 < by["NF4"]["relative_mse"] < 0.010
  assert by["NF4"]["bits_per_param"] == 4.5 and abs(by["NF4 + DQ"]["bits_per_param"] - 4.127) < 1e-3
  for t in ("NF4", "FP4", "INT4"):
    assert abs(by[f"{t} + DQ"]["relative_mse"] / by[t]["relative_mse"] - 1) < 0.01


def test_text_windows_are_spread_and_disjoint():
  ids = np.arange(1000)
  w = parts.text_windows(ids, 7, 100)
  assert w.shape == (7, 100) and w[0, 0] == 0 and w[-1, -1] == 999
  assert np.all(w[1:, 0] >= w[:-1, -1] + 1)  # no overlap
  with pytest.raises(ValueError, match="fewer than"):
    parts.text_windows(ids, 11, 100)
  assert "Python" in parts.pydoc_text()[:100000]


def test_paired_difference():
  d, se = report.paired_difference(np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.0, 2.0]))
  assert d == pytest.approx(4 / 3) and se == pytest.approx(np.std([1, 1, 2], ddof=1) / math.sqrt(3))


def test_equal_budget_ranks_give_equal_trainable_counts(tiny):
  smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64)
  assert parts.equal_budget_ranks(smollm2, parts.QV, LINEAR_NAMES) == (53, 10)
  folder, tensors = tiny
  r_qv, r_all = parts.equal_budget_ranks(ModelConfig.from_hf({**TINY, "head_dim": 16}), parts.QV, LINEAR_NAMES)
  counts = []
  for targets, rank in ((parts.QV, r_qv), (LINEAR_NAMES, r_all)):
    opts = ModelOptions(lora=LoraConfig(rank=rank, targets=targets), scan_layers=True)
    model = parts.base_model(folder, tensors, NF4_DQ, opts)
    counts.append(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
  assert counts[0] == counts[1] > 0


def _data(n, length=24, seed=0):
  """Sequences of one repeating pattern: a tiny model learns them in a few steps."""
  rng = np.random.default_rng(seed)
  pattern = np.arange(10, 10 + 8)
  seqs = [np.roll(np.tile(pattern, 4), rng.integers(8))[:length + 1].astype(np.int32) for _ in range(n)]
  return Tokenized([s[:-1] for s in seqs], [s[1:] for s in seqs], 0)


def test_finetune_bases_share_adapters_and_learn(tiny):
  folder, tensors = tiny
  cfg = load_config("tiny_test").replace(steps=6, eval_size=4, learning_rate=1e-2, warmup_ratio=0.0,
                                         lora_dropout=0.0)
  models = {q: parts.base_model(folder, tensors, q, cfg.model_options(), seed=1) for q in (None, NF4_DQ)}
  adapters = [[np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.LoRAParam))] for m in models.values()]
  assert all(np.array_equal(a, b) for a, b in zip(*adapters))  # bit-identical initial adapters
  first = builder.build(models[None], cfg.optim)
  trainables = [first, builder.build(models[NF4_DQ], cfg.optim, reuse=first),
                builder.build(parts.base_model(folder, tensors, NF4_DQ, cfg.model_options(), seed=2), cfg.optim,
                              reuse=first)]
  curves = [parts.finetune(t, _data(16), _data(4, seed=1), cfg, eval_every=3) for t in trainables]
  for c in curves:
    assert c.eval_steps == [0, 3, 6] and len(c.train_loss) == 6
    assert c.eval_loss[-1] < 0.8 * c.eval_loss[0], (c.eval_loss, c.train_loss)
  assert curves[0].eval_loss[0] != curves[1].eval_loss[0]  # the bases differ
  # One jitted step for both bases (same model graph): compiled once for the bf16 weights and once
  # for the 4-bit ones; the second NF4 seed reused the latter.
  assert all(t.step is first.step for t in trainables)
  assert first.step.programs["whole"]._cache_size() == 2


def _fake_results(ppl_order=("NF4", "FP4", "INT4")):
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 0.01, 16)
  nll = {"bf16": 3.0 + noise}
  for i, t in enumerate(ppl_order):
    nll[t] = 3.1 + 0.1 * i + noise + rng.normal(0, 0.001, 16)
    nll[f"{t} + DQ"] = nll[t] + rng.normal(0, 0.001, 16)
  curve = lambda end: {"eval_steps": [0, 5], "eval_loss": [2.0, end], "train_loss": [1.0] * 5,  # noqa: E731
                       "trainable": 1000, "seconds": 1.0}
  return {
      "meta": {"machine": "m", "jax": "j", "backend": "cpu", "config": "c", "linear_params": 1,
               "recipe": {"dataset": "d", "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05,
                          "learning_rate": 1e-3, "batch_size": 4, "max_seq_len": 144, "steps": 5,
                          "seed": 0}},
      "ppl": {"nll": {k: v.tolist() for k, v in nll.items()}, "text_chars": 10, "text_tokens": 10,
              "scored_tokens": 16 * 511, "python": "3", "command": "python scripts/quality.py --parts ppl",
              "seconds": 1.0},
      "finetune": {"runs": {"bf16": {"0": curve(0.100), "1": curve(0.102)},
                            "NF4 + DQ": {"0": curve(0.1005), "1": curve(0.1025)}},
                   "train_examples": 1, "eval_examples": 1, "eval_target_tokens": 1,
                   "command": "python scripts/quality.py --parts finetune", "seconds": 1.0},
      "textparity": {"runs": {"bf16": {"0": curve(2.10), "1": curve(2.11)},
                              "NF4 + DQ": {"0": curve(2.20), "1": curve(2.21)}},
                     "train_examples": 353, "eval_examples": 48, "eval_target_tokens": 12240,
                     "text_tokens": 113108, "train_tokens": 90486, "length": 256, "steps": 5,
                     "command": "python scripts/quality.py --parts textparity", "seconds": 1.0},
      "textplacement": {"runs": {"q,v r=53": {"0": curve(2.30), "1": curve(2.31)},
                                 "all linear r=10": {"0": curve(2.25), "1": curve(2.26)}},
                        "train_examples": 353, "eval_examples": 48, "eval_target_tokens": 12240,
                        "ranks": {"qv": 53, "all": 10}, "alpha_over_r": 2.0, "text_tokens": 113108,
                        "train_tokens": 90486, "length": 256, "steps": 5,
                        "command": "python scripts/quality.py --parts textplacement", "seconds": 1.0},
      "placement": {"runs": {"q,v r=53": {"0": curve(0.12), "1": curve(0.11)},
                             "all linear r=10": {"0": curve(0.11), "1": curve(0.115)}},
                    "train_examples": 1, "eval_examples": 1, "eval_target_tokens": 1,
                    "ranks": {"qv": 53, "all": 10},
                    "alpha_over_r": 2.0, "command": "python scripts/quality.py --parts placement", "seconds": 1.0},
  }


def test_report_states_what_was_measured(tmp_path):
  results = _fake_results()
  text = report.render(results, "plot.png")
  assert "`python scripts/quality.py --parts ppl`" in text and "--parts finetune" in text
  assert "pair by pair without DQ: holds" in text and "Within 1%: **yes**" in text
  assert "16 non-overlapping windows of 512 tokens" in text
  claims = {c: v for c, _, v, _ in report.verdicts(results)}
  assert claims["perplexity NF4 < FP4 < INT4 (without DQ)"] == "holds"
  assert claims["NF4 + DQ base matches bf16 base after the same LoRA run (final eval loss within 1%; "
                "demo replies)"] == "holds"
  assert claims["NF4 + DQ base matches bf16 base after the same LoRA run (final eval loss within 1%; "
                "held-out text)"] == "does not hold"  # +4.7%
  assert "## 2b. Fine-tuning parity on held-out text" in text and "353 consecutive 256-token rows" in text
  assert claims["LoRA on all linear layers beats q,v only at an equal parameter budget (held-out text)"] == "holds"
  assert "## 3b. Adapter placement on held-out text" in text
  assert claims["LoRA on all linear layers beats q,v only at an equal parameter budget (demo replies)"].startswith(
      "not resolved")
  swapped = _fake_results(("INT4", "FP4", "NF4"))
  assert "NF4 < FP4 and NF4 < INT4 and FP4 < INT4 are reversed" in report.render(swapped, "plot.png")
  swapped_claims = {c: v for c, _, v, _ in report.verdicts(swapped)}
  assert swapped_claims["perplexity NF4 < FP4 < INT4 (with DQ)"].startswith("does not hold")
  results["finetune"]["runs"]["NF4 + DQ"]["0"]["eval_loss"][-1] = 0.2
  assert "Within 1%: **no**" in report.render(results, "plot.png")
  quality.write_report(results, tmp_path)
  assert (tmp_path / "quality_finetune.png").stat().st_size > 1000 and (tmp_path / "QUALITY.md").is_file()
  json.dumps(results)  # the results file is plain JSON


def test_command_line_round_trip():
  args = quality.parse(["--parts", "ppl,finetune", "--seeds", "0,3", "--steps", "7"])
  assert args.parts == ["ppl", "finetune"] and args.seeds == [0, 3]
  assert quality.part_command("finetune", args) == (
      "python scripts/quality.py --parts finetune --config smollm2_135m_cpu --steps 7 --seeds 0,3 --eval-every 5")
  assert quality.parse(quality.part_command("ppl", args).split()[2:]).ppl_windows == args.ppl_windows
  with pytest.raises(SystemExit):
    quality.parse(["--parts", "nope"])


@pytest.mark.parametrize("folder", ["docs", "docs/quality_smollm2"])
def test_report_renders_the_committed_quality_md_byte_for_byte(tmp_path, folder):
  """Each committed QUALITY.md is exactly what quality_report.py renders from the results beside it."""
  out = tmp_path / "QUALITY.md"
  assert report.main([str(ROOT / folder / "quality_results.json"), str(out)]) == 0
  assert out.read_bytes() == (ROOT / folder / "QUALITY.md").read_bytes()


def test_recipe_keeps_the_flat_keys_the_report_reads():
  """A new run records its config under the same flat keys as the committed results."""
  committed = json.loads((ROOT / "docs" / "quality_results.json").read_text())["meta"]
  recipe = quality.recipe(load_config(committed["config"]))
  assert set(committed["recipe"]) <= set(recipe)
  assert recipe["lora_rank"] == 16 and recipe["max_seq_len"] == 144 and recipe["lora_targets"] == LINEAR_NAMES
  json.dumps(recipe)


def test_results_of_another_model_are_not_mixed_into_one_report(tmp_path):
  """A run on another model that would keep some of the folder's earlier tables stops before
  measuring anything, and leaves the results file as it was."""
  results = tmp_path / "quality_results.json"
  text = json.dumps({"meta": {"model": {"kind": "gguf"}}, "weights": {"command": "earlier"}})
  results.write_text(text)
  with pytest.raises(SystemExit, match="another model"):
    quality.main(["--model", str(tmp_path / "other"), "--parts", "ppl", "--out-dir", str(tmp_path)])
  assert results.read_text() == text
