"""AdamW with linear warm-up + cosine decay and global-norm clipping (SPEC section 4), from
config.optimizer. Weight decay (decoupled, scaled by the LR as in optax.adamw) applies to matrices
only, i.e. dense kernels (`kernel`, and the attention projections `wq/wk/wv/wo`); biases (also
the 2-D per-head `bq/bk/bv`), LayerNorm scales/offsets, the token/special embedding tables and the
position tables are not decayed (ours; MaskGIT/big_vision practice; the tied token table counts as
an embedding).
"""
import flax
import flax.linen
import optax

_DECAY_NAMES = ("kernel", "wq", "wk", "wv", "wo")


def learning_rate_schedule(config) -> optax.Schedule:
  o = config.optimizer
  num_steps = int(config.train.num_steps)
  warmup = min(int(o.warmup_steps), max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(o.peak_lr), warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=float(o.peak_lr) * float(o.end_lr_factor))


def decay_mask(params):
  """True where weight decay applies: dense kernels of rank >= 2 (works on boxed params too)."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: (path[-1] in _DECAY_NAMES and len(getattr(flax.linen.meta.unbox(x), "shape", ())) >= 2)
          for path, x in flat.items()}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(float(o.grad_clip_norm)),
      optax.adamw(learning_rate_schedule(config), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                  weight_decay=float(o.weight_decay), mask=decay_mask))
