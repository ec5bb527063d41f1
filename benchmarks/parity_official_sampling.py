"""Step-for-step parity of our masked decoding with the official sampler (needs torch; never CI).

The official `sample_t2i`, `sample_it2i` and `sample_i2t` (with `sample_txt_tok`) run on the
random-weight checkpoint of benchmarks/parity_official.py; ours (magvlt_jax.decoding, the loop the
Sampler jits) runs on its conversion with `configs/magvlt.py:official_base` settings. Random
numbers cannot be shared across frameworks, so every draw the official loop makes is fed the
number our loop draws at that step from its key:
  - image codes and text ids (`Categorical.sample`): our uniform for that slot, turned into a
    sample by the inverse CDF in our id order (all ids for images; the top-k ids by logit for text),
  - the Gumbel noise of the reveal choice (`exponential_` in `_get_next_mask`): our Gumbel,
  - the text slots to re-mask (`torch.multinomial` in `_get_txt_mask`): our Gumbel top-k,
re-derived here from the key splits of decoding._step. Everything else is the official code as
written: the counts per step, which slots are revealed, the re-masking rule, the length
prediction. Same draws + same rules => the same tokens: the script compares, after every step,
which slots are masked, and at the end the image codes, the predicted caption lengths, the caption
ids and their scores. Image codes are given (random codes stand in for VQ-GAN `get_codes` of an
image; parity_official.py shows the VQ-GANs give identical codes).

  python benchmarks/parity_official_sampling.py --size small   # D=256, 2 layers, 2 heads
  python benchmarks/parity_official_sampling.py --size base    # the released base shapes

Phases (the torch ones in --torch_python, default /work/venv_torch/bin/python): torch builds the
official model and checkpoint (parity_official.run_official); jax converts it, decodes and writes
its draws (tape.npz); torch samples with those draws; jax compares.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import parity_official as po  # pylint: disable=wrong-import-position

N_TXT, N_IMG, V_IMG, TOP_K = 64, 256, 16384, 32
T2I_STEPS, I2T_STEPS = 10, 12
I2T_CANDIDATES = 4
BLOCK = 128  # magvlt_jax.categorical.BLOCK: the two-level running sum's block


# ---------------------------------------------------------------------------- torch half
def _inverse_cdf(torch, logits, u):
  """Mirror of magvlt_jax.categorical.sample: the first id whose two-level running sum of
  exp(l - max l) exceeds u * total. logits [N, V] float32, u [N] -> ids [N]."""
  n, vocab = logits.shape
  mass = torch.exp(logits - logits.max(-1, keepdim=True).values)
  blocks = -(-vocab // BLOCK)
  mass = torch.nn.functional.pad(mass, (0, blocks * BLOCK - vocab)).reshape(n, blocks, BLOCK)
  block_mass = mass.sum(-1)
  block_cum = torch.cumsum(block_mass, -1)
  total = block_cum[:, -1]
  below = lambda x: torch.nextafter(x, torch.zeros_like(x))
  target = torch.minimum(u * total, below(total))
  b = (block_cum <= target[:, None]).sum(-1).clamp(max=blocks - 1)
  start = (block_cum - block_mass).gather(1, b[:, None])[:, 0]
  inner_cum = torch.cumsum(mass[torch.arange(n), b], -1)
  rest = torch.minimum(torch.clamp(target - start, min=0.0), below(inner_cum[:, -1]))
  j = (inner_cum <= rest[:, None]).sum(-1).clamp(max=BLOCK - 1)
  return b * BLOCK + j


class _Tape:
  """Our draws, consumed by the patched torch draws in the official loop's order."""

  def __init__(self, arrays):
    self.a = arrays
    self.mode = None
    self.step = {}
    self.ctx = None
    self.record = {}

  def start(self, mode):
    self.mode, self.step, self.ctx = mode, {"sample": 0, "reveal": 0, "remask": 0}, None

  def take(self, name, kind):
    value = self.a[f"{self.mode}/{name}"][self.step[kind]]
    self.step[kind] += 1
    return value

  def log(self, name, value):
    self.record.setdefault(f"{self.mode}/{name}", []).append(np.asarray(value))


def _patch(torch, model, tape, codes):
  """Routes the official loop's random draws through the tape and records its states."""
  from torch.distributions.categorical import Categorical
  import magvlt.models.maskgit.maskgit as mg

  def sample(dist, sample_shape=torch.Size()):
    logits = dist.logits.float()
    if logits.shape[-1] == V_IMG:  # image codes at every image slot, [B * 256, V]
      u = torch.as_tensor(tape.take("image_u", "sample")).reshape(-1)
      return _inverse_cdf(torch, logits.reshape(-1, V_IMG), u).reshape(logits.shape[:-1])
    if tape.mode != "i2t":  # T2I text draws: the official loop computes them and never uses them
      return logits.argmax(-1)
    # sample_txt_tok: [S, L, V_txt] after top_k_top_p_filtering; only the text slots are used.
    u = np.zeros(logits.shape[:-1], np.float32)
    u[:, -N_TXT:] = tape.take("text_u", "sample")
    values, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # lax.top_k's order
    finite = torch.isfinite(values).sum(-1)
    assert int(finite[:, -N_TXT:].min()) >= TOP_K, "top-k filtering kept fewer than top_k ids"
    flat = values[..., :TOP_K].reshape(-1, TOP_K)
    pick = _inverse_cdf(torch, flat, torch.as_tensor(u).reshape(-1)).reshape(logits.shape[:-1])
    return order.gather(-1, pick[..., None])[..., 0]

  Categorical.sample = sample
  orig_exponential = torch.Tensor.exponential_

  def exponential_(t, *args, **kwargs):
    if tape.ctx is None or tape.ctx["kind"] != "reveal":
      return orig_exponential(t, *args, **kwargs)
    b = tape.ctx["b"]
    g = tape.ctx["gumbel"][b][tape.ctx["masked"][b]]
    assert g.shape == tuple(t.shape), (g.shape, t.shape)
    tape.ctx["b"] += 1
    return t.copy_(torch.exp(-torch.as_tensor(g)))  # the official takes -log(Exp) = our Gumbel

  torch.Tensor.exponential_ = exponential_
  orig_next_mask = model._get_next_mask

  def next_mask(prev_loc_mask, *args, **kwargs):
    img = prev_loc_mask[:, -N_IMG:].numpy()
    tape.ctx = {"kind": "reveal", "b": 0, "gumbel": tape.take("image_g", "reveal"),
                "masked": [np.nonzero(row)[0] for row in img]}
    out = orig_next_mask(prev_loc_mask, *args, **kwargs)
    tape.ctx = None
    tape.log("image_masked", out[:, -N_IMG:].numpy())
    return out

  model._get_next_mask = next_mask
  orig_multinomial = torch.multinomial

  def multinomial(probs, n, *args, **kwargs):
    if tape.ctx is None or tape.ctx["kind"] != "remask":
      return orig_multinomial(probs, n, *args, **kwargs)
    b = tape.ctx["b"]
    g = torch.as_tensor(tape.ctx["gumbel"][b][:probs.shape[0]])
    tape.ctx["b"] += 1
    return (torch.log(probs) + g).topk(n).indices  # Gumbel top-k = draws without replacement

  torch.multinomial = multinomial
  orig_txt_mask = model._get_txt_mask

  def txt_mask(*args, **kwargs):
    tape.ctx = {"kind": "remask", "b": 0, "gumbel": tape.take("text_g", "remask")}
    out = orig_txt_mask(*args, **kwargs)
    tape.ctx = None
    tape.log("text_masked", out[:, -N_TXT:].numpy())
    return out

  model._get_txt_mask = txt_mask
  orig_txt_tok = model.sample_txt_tok

  def sample_txt_tok(*args, **kwargs):
    tape.log("length", args[5].numpy())  # N, after the official length prediction
    ids, score = orig_txt_tok(*args, **kwargs)
    tape.log("text_ids", ids.numpy())
    tape.log("text_score", score.numpy())
    return ids, score

  model.sample_txt_tok = sample_txt_tok
  orig_predict_length = model.predict_length

  def predict_length(x):
    logits = orig_predict_length(x)
    tape.log("length_logits", logits.numpy())
    return logits

  model.predict_length = predict_length
  vq = model.model_vqvae
  vq.get_codes = lambda pixels: torch.as_tensor(codes).long()

  def decode_code(code):
    tape.log("image_codes", code.reshape(code.shape[0], -1).numpy())
    return torch.zeros((code.shape[0], 3, 16, 16))

  vq.decode_code = decode_code
  mg.token2txt = lambda ids, tokenizer, **kw: [""] * len(ids)  # strings only (logging)
  torch.cuda.FloatTensor = lambda size: torch.empty(tuple(size)).uniform_()  # sample_i2t's CUDA-only line


def run_official_sampling(anchors: str, size: str, out_dir: str):
  """Runs in the torch interpreter: the official samplers with our draws -> official_sampling.npz."""
  import types
  import torch
  sys.path.insert(0, anchors)
  sys.modules.setdefault("clip", types.ModuleType("clip"))
  from omegaconf import OmegaConf
  from magvlt.datamodules.tokenizers import TokenizerUtils
  from magvlt.models import build_model

  cfg = OmegaConf.load(os.path.join(anchors, "configs", "magvlt-it2it-base-sampling.yaml"))
  if size == "small":
    for k, v in po._SMALL.items():
      cfg.stage2.hparams[k] = v
  cfg.stage2.mask_hparams.i2t_n_steps = cfg.sampling.txt_num_steps  # as sampling_i2t.py
  cfg.sampling.txt_sample_size = cfg.sampling.txt_num_cand_samples = I2T_CANDIDATES
  tok = TokenizerUtils()
  tok.build_tokenizer("ClipBPE", N_TXT, lowercase=True, dropout=None)
  model = build_model(cfg, tokenizer=tok.tokenizer).eval()
  state = torch.load(os.path.join(out_dir, "official.ckpt"), map_location="cpu")["state_dict"]
  model.load_state_dict(state, strict=True)
  arrays = dict(np.load(os.path.join(out_dir, "tape.npz")))
  tape = _Tape(arrays)
  _patch(torch, model, tape, arrays["codes"])
  s = cfg.sampling
  txt = torch.as_tensor(arrays["txt"]).long()
  txt_mask = (torch.arange(N_TXT)[None] < torch.as_tensor(arrays["txt_len"])[:, None]).float()
  kw = dict(n_steps=T2I_STEPS, strategy=s.img_mask_sample_method, temp_st=s.img_temperature_start,
            temp_end=s.img_temperature_end, multi_temp_st=s.img_mult_temperature_start,
            multi_temp_end=s.img_mult_temperature_end)
  with torch.no_grad():
    tape.start("t2i")
    model.sample_t2i(txt, txt_mask, **kw)
    tape.start("inpaint")
    keep = torch.as_tensor(~arrays["inpaint_region"].reshape(1, 1, 16, 16)).float()
    model.sample_it2i(txt, txt_mask, source_img=torch.zeros(1, 3, 256, 256), img_mask=keep, **kw)
    tape.start("i2t")
    dummy = torch.full((1, N_TXT), tok.tokenizer.eos_token_id).long()  # as sampling_i2t.py
    model.sample_i2t(torch.zeros(1, 3, 256, 256), dummy, torch.ones(1, 16))
  np.savez(os.path.join(out_dir, "official_sampling.npz"),
           **{k: np.stack(v) for k, v in tape.record.items()})


# ---------------------------------------------------------------------------- jax half
def _config(size):
  from magvlt_jax import configs_util
  config = configs_util.load_config("configs/magvlt.py:official_base")
  if size == "small":
    config.model.embed_dim, config.model.num_layers = po._SMALL["embed_dim"], po._SMALL["n_layers"]
    config.model.num_heads = po._SMALL["n_heads"]
  config.model.scan_layers = False
  return config


def _draws(key, steps, batch):
  """The numbers decoding._step draws at each step from `key` (same splits, same shapes)."""
  import jax
  import jax.numpy as jnp
  out = {"image_u": [], "image_g": [], "text_u": [], "text_g": []}
  for step in range(steps):
    k_img, k_txt, k_mask = jax.random.split(jax.random.fold_in(key, step), 3)
    k_sample, k_noise = jax.random.split(k_img)
    out["image_u"].append(jax.random.uniform(k_sample, (batch, N_IMG), jnp.float32))
    out["image_g"].append(jax.random.gumbel(k_noise, (batch, N_IMG), jnp.float32))
    out["text_u"].append(jax.random.uniform(k_txt, (batch, N_TXT), jnp.float32))
    out["text_g"].append(jax.random.gumbel(k_mask, (batch, N_TXT), jnp.float32))
  return {k: np.stack([np.asarray(x) for x in v]) for k, v in out.items()}


def run_ours(size: str, out_dir: str, seed: int = 0) -> dict:
  """Converts the official checkpoint, decodes T2I / inpainting / I2T with our loop (history
  recorded) and writes our draws (tape.npz) and results (ours.npz)."""
  sys.path.insert(0, os.path.dirname(_HERE))
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  import jax.numpy as jnp
  from magvlt_jax import checkpoints, decoders, decoding, sequence
  from magvlt_jax.convert import magvlt_official
  from magvlt_jax.models import transformer

  config = _config(size)
  work = os.path.join(out_dir, "converted")
  if not os.path.isdir(os.path.join(work, "checkpoints")):
    magvlt_official.convert_file(os.path.join(out_dir, "official.ckpt"), work, config)
  params = checkpoints.load_params(work, abstract=transformer.param_shapes(config))
  model = transformer.from_config(config)
  ref = dict(np.load(os.path.join(out_dir, "official.npz")))
  txt, txt_len = ref["txt"].astype(np.int32), ref["txt_len"].astype(np.int32)
  batch = txt.shape[0]
  codes = ref["img"][:1].astype(np.int32)
  region = decoding.centre_region(N_IMG)  # the official sample_it2i default: centre 8x8
  eos = 49407
  spec = lambda task, **kw: decoding.spec_from_config(config, task, eos_id=eos, vocab_limit=49408,
                                                      record_history=True, **kw)
  keys = {t: jax.random.PRNGKey(seed + i) for i, t in enumerate(("t2i", "inpaint", "i2t"))}
  ours, tape = {}, {"txt": txt, "txt_len": txt_len, "codes": codes, "inpaint_region": region}
  # Params are jit arguments (a closure would bake them into the program as constants).
  lf = lambda p: decoders.model_logits_fn(model, p)
  runs = {
      "t2i": (lambda p, k: decoding.text_to_image(lf(p), spec("t2i"), k, txt, txt_len),
              T2I_STEPS, batch),
      "inpaint": (lambda p, k: decoding.inpaint(
          lf(p), spec("inpaint"), k, np.repeat(codes, batch, 0), region, txt, txt_len),
          T2I_STEPS, batch),
      "i2t": (lambda p, k: decoding.image_to_text(
          lf(p), spec("i2t"), k, np.repeat(codes, I2T_CANDIDATES, 0)),
          I2T_STEPS, I2T_CANDIDATES),
  }
  for task, (fn, steps, b) in runs.items():
    out = jax.device_get(jax.jit(fn)(params, keys[task]))
    for name, value in _draws(keys[task], steps, b).items():
      tape[f"{task}/{name}"] = value
    ours.update({f"{task}/image_codes": out.image_codes, f"{task}/text_ids": out.text_ids,
                 f"{task}/text_length": out.text_length, f"{task}/text_score": out.text_score,
                 f"{task}/image_masked": out.history["image_masked"],
                 f"{task}/text_masked": out.history["text_masked"]})
  # The length pass as decoding.decode builds it, showing 16 text slots (official) or all 64
  # (our trainer's default), for the length-logit errors in the report.
  layout = spec("i2t").layout

  def length_logits(p, shown):
    inputs = sequence.build_input(layout, codes, np.full((1, N_TXT), eos, np.int32),
                                  np.zeros((1, N_IMG), bool), np.ones((1, N_TXT), bool),
                                  image_vocab_size=V_IMG)
    attn = sequence.attention_mask(layout, np.full((1,), shown, np.int32))
    return lf(p)(inputs, attn, layout=layout, outputs=("length",))["length"]

  for shown in (16, N_TXT):
    ours[f"i2t/length_logits_{shown}"] = np.asarray(jax.jit(length_logits, static_argnums=1)(
        params, shown))
  np.savez(os.path.join(out_dir, "tape.npz"), **tape)
  np.savez(os.path.join(out_dir, "ours.npz"), **ours)
  return {"size": size}


def _revealed(masked_after_each_step, start):
  left = masked_after_each_step.sum(-1)
  return [int(v) for v in np.concatenate([[start], left[:-1]]) - left]


def compare(out_dir: str) -> dict:
  ours = dict(np.load(os.path.join(out_dir, "ours.npz")))
  ref = dict(np.load(os.path.join(out_dir, "official_sampling.npz")))
  eq = lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b)))
  report = {}
  for task, start in (("t2i", N_IMG), ("inpaint", 64)):
    steps = ref[f"{task}/image_masked"]  # [T, B, n_img] after each step
    mine = ours[f"{task}/image_masked"]
    report[task] = {
        "steps": int(steps.shape[0]),
        "steps_with_equal_masks": int(sum(eq(a, b) for a, b in zip(steps, mine))),
        "revealed_per_step_official": _revealed(steps[:, 0], start),
        "revealed_per_step_ours": _revealed(mine[:, 0], start),
        "codes_equal_frac": float((ref[f"{task}/image_codes"][0] == ours[f"{task}/image_codes"]).mean()),
    }
  report["i2t"] = {
      "length_official": ref["i2t/length"][0].tolist(),
      "length_ours": ours["i2t/text_length"].tolist(),
      "length_logits_rel_err_probe_16_slots": po._rel(ours["i2t/length_logits_16"],
                                                      ref["i2t/length_logits"][0]),
      "length_logits_rel_err_probe_64_slots": po._rel(ours[f"i2t/length_logits_{N_TXT}"],
                                                      ref["i2t/length_logits"][0]),
      "steps_with_equal_masks": int(sum(eq(a, b) for a, b in zip(ref["i2t/text_masked"],
                                                                 ours["i2t/text_masked"]))),
      "steps": int(ref["i2t/text_masked"].shape[0]),
      "text_ids_equal_frac": float((ref["i2t/text_ids"][0] == ours["i2t/text_ids"]).mean()),
      "text_score_max_abs_diff": float(np.abs(ref["i2t/text_score"][0] - ours["i2t/text_score"]).max()),
  }
  return report


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=("small", "base"), default="small")
  ap.add_argument("--phase", choices=("all", "build", "ours", "official", "compare"), default="all")
  ap.add_argument("--out", default="", help="working folder (default: a temporary one)")
  ap.add_argument("--anchors", default=po._ANCHORS if os.path.isdir(po._ANCHORS) else po._DEFAULT_ANCHORS)
  ap.add_argument("--torch_python", default="/work/venv_torch/bin/python")
  args = ap.parse_args()
  out_dir = args.out or tempfile.mkdtemp(prefix="magvlt_sampling_parity_")
  os.makedirs(out_dir, exist_ok=True)
  if args.phase == "build":
    po.run_official(args.anchors, args.size, out_dir)
    return
  if args.phase == "official":
    run_official_sampling(args.anchors, args.size, out_dir)
    return
  env = dict(os.environ, PYTHONPATH="")  # the torch interpreter must not see magvlt_jax
  torch_phase = lambda phase: subprocess.run(
      [args.torch_python, os.path.abspath(__file__), "--phase", phase, "--size", args.size,
       "--out", out_dir, "--anchors", args.anchors], check=True, env=env)
  if args.phase == "all":
    torch_phase("build")
  if args.phase in ("all", "ours"):
    run_ours(args.size, out_dir)
  if args.phase == "all":
    torch_phase("official")
  if args.phase in ("all", "compare"):
    print(json.dumps(compare(out_dir), indent=1))


if __name__ == "__main__":
  main()
