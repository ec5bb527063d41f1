"""Output parity with the official PyTorch MAGVLT on random weights (needs torch; never run in CI).

Builds the official model from ../shared/anchors/magvlt_official (random weights; every bias and
norm weight perturbed away from its init so a dropped bias cannot pass), saves its state_dict as a
Lightning .ckpt, converts it with magvlt_jax.convert.magvlt_official and compares, for the T2I, I2T
and IT2IT-mask layouts with the official masks: hidden states, image / text logits and length
logits; and VQGAN codes and decodes of random images. Relative error = ||ours - official|| /
||official|| (float32, full-precision matmuls).

  python benchmarks/parity_official.py --size small   # D=256, 2 layers, 2 heads; full f16 VQGAN
  python benchmarks/parity_official.py --size base    # the released base shapes (slow on CPU)

The torch half runs in a separate interpreter (--torch_python, default /work/venv_torch/bin/python,
with torch, omegaconf, einops, tokenizers, pytorch-lightning; `clip` is stubbed) and hands its
tensors over in an .npz; this half needs only magvlt_jax. The official code is only read and run
from the anchors folder, never imported by magvlt_jax.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ANCHORS = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "shared", "anchors", "magvlt_official")
_DEFAULT_ANCHORS = "/work/shared/anchors/magvlt_official"
_SMALL = dict(embed_dim=256, n_layers=2, n_heads=2)
TASKS = ("t2i", "i2t", "it2it-mask")
CAPTIONS = ("a close up of a vase with different flowers in it", "Two dogs, one cat & a bird!")


# ---------------------------------------------------------------------------- torch half
def run_official(anchors: str, size: str, out_dir: str, seed: int = 0):
  """Runs in the torch interpreter: writes official.ckpt and official.npz into out_dir."""
  import types
  import torch
  sys.path.insert(0, anchors)
  sys.modules["clip"] = types.ModuleType("clip")
  from omegaconf import OmegaConf
  from magvlt.datamodules.tokenizers import TokenizerUtils
  from magvlt.models import build_model

  torch.manual_seed(seed)
  cfg = OmegaConf.load(os.path.join(anchors, "configs", "magvlt-it2it-base-sampling.yaml"))
  if size == "small":
    for k, v in _SMALL.items():
      cfg.stage2.hparams[k] = v
  tok = TokenizerUtils()
  tok.build_tokenizer("ClipBPE", 64, lowercase=True, dropout=None)
  model = build_model(cfg, tokenizer=tok.tokenizer).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("bias", "output_bias"):
        p.add_(0.05 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:  # LayerNorm / GroupNorm weights
        p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
  torch.save({"state_dict": model.state_dict(), "epoch": 0}, os.path.join(out_dir, "official.ckpt"))

  items = [tok.get_input(c) for c in CAPTIONS]
  txt = torch.stack([torch.as_tensor(np.asarray(i.txt)) for i in items]).long()
  txt_mask = torch.stack([torch.as_tensor(np.asarray(i.txt_mask)) for i in items])
  B = txt.shape[0]
  img = torch.randint(0, 16384, (B, 256), generator=g)
  out = {"txt": txt.numpy(), "txt_len": txt_mask.sum(-1).long().numpy(), "img": img.numpy()}
  with torch.no_grad():
    for t, task in enumerate(TASKS):
      tok_in, pos, loc_img, loc_txt, loc_spc = model._get_input(img, txt, task=task)
      torch.manual_seed(seed + 10 + t)
      loc_mask, attn_mask, _ = model._get_mask(loc_img, loc_txt, loc_spc, r=torch.tensor([0.3, 0.7]),
                                               task=task, txt_mask=txt_mask)
      tok_masked, spc = model._apply_mask(tok_in, loc_spc, loc_mask, loc_img, loc_txt)
      attn = attn_mask.clone()
      x = model.model(tok_masked, pos, loc_img, loc_txt, spc, attn_mask=attn, amp=False)
      logits = model.model.lm_layer(x, model.model.tok_emb)
      vi = model.model.vocab_size_img
      out[f"{task}/hidden"] = x.numpy()
      out[f"{task}/image_logits"] = logits[loc_img].view(B, -1, logits.shape[-1])[..., :vi].numpy()
      out[f"{task}/text_logits"] = logits[loc_txt].view(B, -1, logits.shape[-1])[..., vi:].numpy()
      out[f"{task}/length_logits"] = model.predict_length(x).numpy()
      out[f"{task}/image_masked"] = loc_mask[loc_img].view(B, -1).numpy()
      out[f"{task}/text_masked"] = loc_mask[loc_txt].view(B, -1).numpy()
      out[f"{task}/attn_mask"] = attn.numpy()  # after the in-place "at least one attention" fix
    pixels = torch.rand((B, 3, 256, 256), generator=g) * 2 - 1
    vq = model.model_vqvae
    codes = vq.get_codes(pixels)
    out["vq/pixels"] = pixels.numpy()
    out["vq/codes"] = codes.numpy()
    out["vq/decoded"] = vq.decode_code(img.view(B, 16, 16)).numpy()  # decode the given codes
  np.savez(os.path.join(out_dir, "official.npz"), **out)


# ---------------------------------------------------------------------------- jax half
def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(size: str, out_dir: str) -> dict:
  sys.path.insert(0, os.path.dirname(_HERE))  # the repository's magvlt_jax
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  import jax.numpy as jnp
  from magvlt_jax import checkpoints, configs_util
  from magvlt_jax import sequence as seq
  from magvlt_jax.convert import magvlt_official
  from magvlt_jax.models import transformer, vqgan

  config = configs_util.load_config("configs/magvlt.py:official_base")
  if size == "small":
    config.model.embed_dim, config.model.num_layers = _SMALL["embed_dim"], _SMALL["n_layers"]
    config.model.num_heads = _SMALL["n_heads"]
  config.model.scan_layers = False
  work = os.path.join(out_dir, "converted")
  t0 = time.time()
  magvlt_official.convert_file(os.path.join(out_dir, "official.ckpt"), work, config)
  convert_s = time.time() - t0
  params = checkpoints.load_params(work, abstract=transformer.param_shapes(config))
  vq_params = vqgan.load_params(work, config.vqgan)
  ref = dict(np.load(os.path.join(out_dir, "official.npz")))
  model = transformer.from_config(config)
  task_ids = {"t2i": seq.Task.T2I, "i2t": seq.Task.I2T, "it2it-mask": seq.Task.IT2IT}
  report = {"size": size, "convert_s": round(convert_s, 1)}
  for task in TASKS:
    layout = seq.layout_from_config(config, task_ids[task])
    inputs = seq.build_input(layout, ref["img"], ref["txt"], ref[f"{task}/image_masked"],
                             ref[f"{task}/text_masked"], image_vocab_size=16384)
    mask = seq.attention_mask(layout, ref["txt_len"])
    out = model.apply({"params": params}, inputs, mask, layout=layout, deterministic=True,
                      outputs=("image", "text", "length", "hidden"))
    r = {"attn_mask_equal": bool(np.array_equal(np.asarray(mask[:, 0]), ref[f"{task}/attn_mask"]))}
    # The official predict_length reads slot 259 (BOT of the I2T layout) whatever the layout;
    # lengths are only predicted in I2T layouts, so T2I has no length to compare.
    names = ("hidden", "image_logits", "text_logits") + (("length_logits",) if task != "t2i" else ())
    for name in names:
      r[name] = _rel(out[name.replace("_logits", "")], ref[f"{task}/{name}"])
    report[task] = r
  pixels = jnp.asarray(ref["vq/pixels"].transpose(0, 2, 3, 1))
  codes = np.asarray(vqgan.encode(vq_params, pixels, config.vqgan))
  decoded = np.asarray(vqgan.decode(vq_params, jnp.asarray(ref["img"]), config.vqgan))
  report["vq"] = {"codes_equal_frac": float((codes == ref["vq/codes"]).mean()),
                  "decode_rel": _rel(decoded, np.clip(ref["vq/decoded"].transpose(0, 2, 3, 1), -1, 1))}
  return report


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=("small", "base"), default="small")
  ap.add_argument("--phase", choices=("all", "torch", "jax"), default="all",
                  help="torch: only the official half; jax: only ours (on an existing --out)")
  ap.add_argument("--out", default="", help="working folder (default: a temporary one)")
  ap.add_argument("--anchors", default=_ANCHORS if os.path.isdir(_ANCHORS) else _DEFAULT_ANCHORS)
  ap.add_argument("--torch_python", default="/work/venv_torch/bin/python")
  args = ap.parse_args()
  out_dir = args.out or tempfile.mkdtemp(prefix="magvlt_parity_")
  os.makedirs(out_dir, exist_ok=True)
  if args.phase == "torch":
    run_official(args.anchors, args.size, out_dir)
    return
  env = dict(os.environ, PYTHONPATH="")  # the torch interpreter must not see magvlt_jax
  if args.phase == "all":
    subprocess.run([args.torch_python, os.path.abspath(__file__), "--phase", "torch", "--size",
                    args.size, "--out", out_dir, "--anchors", args.anchors], check=True, env=env)
  print(json.dumps(compare(args.size, out_dir), indent=1))


if __name__ == "__main__":
  main()
