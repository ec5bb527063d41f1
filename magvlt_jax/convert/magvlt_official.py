"""Convert a released MAGVLT checkpoint (`magvlt-it2it-{base,large}.ckpt`, kakaobrain/magvlt) into
an ordinary magvlt_jax workdir.

The file is a PyTorch Lightning `.ckpt` whose `state_dict` holds `model.*` (the transformer) and
`model_vqvae.*` (the taming VQGAN); it is read with the torch-free `convert/torch_pickle.py` (no
pickle code runs). Mapping (notes/official_magvlt.md section 8; torch Linear weights are [out, in]):

  model.tok_emb.weight [V_img + V_txt, D]      -> token_embed
  model.tok_emb_spc.weight [10, D]             -> special_embed (same id order: BOI, BOT, BOC, ...)
  model.pos_emb_{img,txt,spc}.pos_embed        -> pos_img / pos_txt / pos_spc
  model.blocks.{i}.ln{1,2}.{weight,bias}       -> block_i/ln{1,2}/{scale,bias}
  model.blocks.{i}.attn.{query,key,value}      -> block_i/attn/w{q,k,v} [D, H, hd], b{q,k,v} [H, hd]
  model.blocks.{i}.attn.proj                   -> block_i/attn/wo [H, hd, D], bo
  model.blocks.{i}.mlp.{0,2}                   -> block_i/mlp/fc{1,2}
  model.lm_layer.linear / .ln / .output_bias   -> head_dense / head_ln / output_bias
  model.length_predictor.weight [64, D]        -> length_head/kernel
  model_vqvae.*                                -> the VQGAN (convert/taming_vqgan.py)

Strict: every key is used and every param filled with the right shape, else a ValueError lists
the missing, unexpected and mis-shaped keys. Scanned params (config.model.scan_layers) are
stacked from the unscanned mapping.

The workdir written: config.json (the given config, default configs/magvlt.py:official_base or
:official_large picked from the width), checkpoints/0 (a TrainState at step 0: the converted
params and a fresh optimizer state, so `--mode=train` fine-tunes from it and the Sampler /
`--mode=evaluate` load its params), tokenizer/params.npz (the VQGAN) and the --text_files
(clip-vocab.json + clip-merges.txt or bpe_simple_vocab_16e6.txt.gz for the official ClipBPE that
official_* configs select; without them set config.text.clip_vocab at load time).

CLI: python -m magvlt_jax.convert.magvlt_official --input magvlt-it2it-base.ckpt --output DIR
"""
import argparse
import os
import shutil
from typing import Callable, Dict, Mapping, Tuple

import jax
import numpy as np

from magvlt_jax.convert import taming_vqgan

TRANSFORMER_PREFIX = "model."
VQGAN_PREFIX = "model_vqvae."
_WIDTH_TO_VARIANT = {1024: "official_base", 1280: "official_large"}


def _linear_in_heads(w, heads):  # torch [out=D, in=D] -> [D_in, H, hd]
  return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)


def _torch_sources(config) -> Dict[str, Tuple[str, Callable]]:
  """Our unscanned flat param path -> (official key without 'model.', torch array -> our array)."""
  m = config.model
  heads, n = int(m.num_heads), int(m.num_layers)
  ident = lambda x: x
  src = {
      "token_embed": ("tok_emb.weight", ident),
      "special_embed": ("tok_emb_spc.weight", ident),
      "pos_img": ("pos_emb_img.pos_embed", ident),
      "pos_txt": ("pos_emb_txt.pos_embed", ident),
      "pos_spc": ("pos_emb_spc.pos_embed", ident),
      "head_dense/kernel": ("lm_layer.linear.weight", np.transpose),
      "head_dense/bias": ("lm_layer.linear.bias", ident),
      "head_ln/scale": ("lm_layer.ln.weight", ident),
      "head_ln/bias": ("lm_layer.ln.bias", ident),
      "output_bias": ("lm_layer.output_bias", ident),
      "length_head/kernel": ("length_predictor.weight", np.transpose),
  }
  for i in range(n):
    b, t = f"block_{i}", f"blocks.{i}"
    for ln in ("ln1", "ln2"):
      src[f"{b}/{ln}/scale"] = (f"{t}.{ln}.weight", ident)
      src[f"{b}/{ln}/bias"] = (f"{t}.{ln}.bias", ident)
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      src[f"{b}/attn/w{ours}"] = (f"{t}.attn.{theirs}.weight", lambda w: _linear_in_heads(w, heads))
      src[f"{b}/attn/b{ours}"] = (f"{t}.attn.{theirs}.bias", lambda x: x.reshape(heads, -1))
    src[f"{b}/attn/wo"] = (f"{t}.attn.proj.weight", lambda w: w.T.reshape(heads, -1, w.shape[0]))
    src[f"{b}/attn/bo"] = (f"{t}.attn.proj.bias", ident)
    for ours, theirs in (("fc1", "0"), ("fc2", "2")):
      src[f"{b}/mlp/{ours}/kernel"] = (f"{t}.mlp.{theirs}.weight", np.transpose)
      src[f"{b}/mlp/{ours}/bias"] = (f"{t}.mlp.{theirs}.bias", ident)
  return src


def _flat_shapes(tree) -> Dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _unflatten(flat: Mapping[str, np.ndarray]):
  out = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def split_state_dict(sd: Mapping[str, np.ndarray]):
  """-> (transformer keys without 'model.', VQGAN keys with 'model_vqvae.', other keys)."""
  model, vq, other = {}, {}, []
  for k, v in sd.items():
    if k.startswith(VQGAN_PREFIX):
      vq[k] = v
    elif k.startswith(TRANSFORMER_PREFIX):
      model[k[len(TRANSFORMER_PREFIX):]] = v
    else:
      other.append(k)
  return model, vq, other


def convert_transformer(model_sd: Mapping[str, np.ndarray], config, source: str = "checkpoint"):
  """Official `model.*` tensors (prefix stripped) -> our transformer params (numpy float32),
  in the layout config.model.scan_layers asks for."""
  from magvlt_jax.models import transformer  # pylint: disable=import-outside-toplevel
  unscanned = config.copy_and_resolve_references()
  unscanned.model.scan_layers = False
  want = _flat_shapes(transformer.param_shapes(unscanned))
  sources = _torch_sources(config)
  if set(sources) != set(want):  # our model grew a param the mapping does not know
    raise ValueError(f"magvlt_official: the mapping does not cover our params "
                     f"{sorted(set(want) ^ set(sources))[:10]}")
  flat, missing, bad_shape, used = {}, [], [], set()
  for name, (key, fn) in sources.items():
    if key not in model_sd:
      missing.append(f"{TRANSFORMER_PREFIX}{key} (for {name} {want[name]})")
      continue
    used.add(key)
    value = np.asarray(fn(np.asarray(model_sd[key], np.float32)))
    if value.shape != want[name]:
      bad_shape.append(f"{TRANSFORMER_PREFIX}{key}: file {tuple(np.shape(model_sd[key]))} -> "
                       f"{value.shape}, but {name} needs {want[name]}")
      continue
    flat[name] = np.ascontiguousarray(value)
  unexpected = [TRANSFORMER_PREFIX + k for k in sorted(set(model_sd) - used)]
  if missing or bad_shape or unexpected:
    raise ValueError(_report(source, "the transformer of the config (model.* / sequence.*)",
                             missing, unexpected, bad_shape))
  params = _unflatten(flat)
  if config.model.get("scan_layers", False):
    params = jax.tree.map(np.asarray, transformer.stack_layers(params, int(config.model.num_layers)))
  return params


def _report(source, what, missing, unexpected, bad_shape):
  lines = [f"{source} does not match {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
           f"{len(bad_shape)} mis-shaped keys"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
    lines += [f"  {title}: {item}" for item in items[:20]]
    if len(items) > 20:
      lines.append(f"  ... {len(items) - 20} more {title}")
  return "\n".join(lines)


def convert_state_dict(sd: Mapping[str, np.ndarray], config, source: str = "checkpoint"):
  """Whole official state dict -> (transformer params, VQGAN params); strict."""
  model_sd, vq_sd, other = split_state_dict(sd)
  if other:
    raise ValueError(_report(source, "a MAGVLT checkpoint (keys model.* and model_vqvae.*)",
                             [], other, []))
  if not vq_sd:
    raise ValueError(f"{source}: no model_vqvae.* keys; a released MAGVLT checkpoint holds the VQGAN")
  params = convert_transformer(model_sd, config, source)
  vq_params = taming_vqgan.convert_state_dict(vq_sd, config.vqgan, source=source)
  return params, vq_params


def default_config(sd: Mapping[str, np.ndarray]):
  """configs/magvlt.py:official_base or :official_large, chosen by the checkpoint's width."""
  from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
  key = TRANSFORMER_PREFIX + "tok_emb.weight"
  if key not in sd:
    raise ValueError(f"checkpoint has no {key}; is it a MAGVLT checkpoint?")
  width = int(np.shape(sd[key])[1])
  if width not in _WIDTH_TO_VARIANT:
    raise ValueError(f"checkpoint width {width} is neither base (1024) nor large (1280); pass --config")
  return configs_util.load_config(f"configs/magvlt.py:{_WIDTH_TO_VARIANT[width]}")


def write_workdir(output: str, config, params, vq_params, text_files=()):
  """config.json, checkpoints/0 (TrainState: params + fresh optimizer state), tokenizer/params.npz
  and `text_files` copied into text/ (CLIP's BPE files for config.text.kind='clip_bpe', or a
  sentencepiece model, copied as spm.model)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from magvlt_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from magvlt_jax.models import vqgan  # pylint: disable=import-outside-toplevel
  from magvlt_jax.train import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
  from magvlt_jax.train import train_state  # pylint: disable=import-outside-toplevel
  ckpt_dir = os.path.join(output, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} is not empty; convert into a new --output directory")
  checkpoints.save_config(output, config)
  params = jax.tree.map(jnp.asarray, params)
  state = train_state.TrainState.create(params, optimizer_lib.make_optimizer(config))
  store = checkpoints.CheckpointStore(ckpt_dir, async_save=False)
  store.save(0, state, data_state=None, force=True)
  store.close()
  vqgan.save_params_npz(os.path.join(output, "tokenizer", vqgan.PARAMS_FILE), vq_params)
  for path in text_files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"text tokenizer file not found: {path}")
    os.makedirs(os.path.join(output, "text"), exist_ok=True)
    name = "spm.model" if path.endswith(".model") else os.path.basename(path)
    shutil.copyfile(path, os.path.join(output, "text", name))


def convert_file(path: str, output: str, config=None, text_files=()):
  """Reads `path`, converts strictly, writes the workdir; returns the config used."""
  from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
  from magvlt_jax.convert import torch_pickle  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"MAGVLT checkpoint not found: {path}")
  sd = torch_pickle.load_state_dict(path)
  if config is None:
    config = default_config(sd)
  configs_util.validate_config(config)
  params, vq_params = convert_state_dict(sd, config, source=path)
  del sd
  write_workdir(output, config, params, vq_params, text_files)
  return config


def main(argv=None):
  from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--input", required=True, help="magvlt-it2it-{base,large}.ckpt")
  ap.add_argument("--output", required=True, help="the workdir to write")
  ap.add_argument("--config", default="",
                  help="config spec path.py:variant (default: configs/magvlt.py:official_base or "
                       ":official_large, by the checkpoint's width)")
  ap.add_argument("--text_files", nargs="*", default=[],
                  help="copied into WORKDIR/text/: clip-vocab.json clip-merges.txt (or "
                       "bpe_simple_vocab_16e6.txt.gz) for the official ClipBPE; a .model is "
                       "copied as spm.model")
  args = ap.parse_args(argv)
  config = configs_util.load_config(args.config) if args.config else None
  config = convert_file(args.input, args.output, config, args.text_files)
  print(f"wrote {args.output} (config variant {config.variant})")


if __name__ == "__main__":
  main()
