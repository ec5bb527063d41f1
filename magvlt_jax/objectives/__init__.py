"""Training objectives behind one interface (objectives/common.Objective), chosen by
`config.objective` (default "magvlt"): the shared trainer, AOT tool and benchmarks build the
objective through `create` and never branch on which one it is. A new objective is a module here
with an Objective subclass and a line in `_KINDS`.
"""
import importlib

# name -> "module:class"; imported only when used.
_KINDS = {
    "magvlt": "magvlt_jax.objectives.magvlt:MagvltObjective",
    "ar": "magvlt_jax.objectives.ar:ArObjective",
    "biart": "magvlt_jax.objectives.ar:BiartObjective",
    "xlxmert": "magvlt_jax.objectives.xlxmert:XlxmertObjective",
}
DEFAULT = "magvlt"


def name_of(config) -> str:
  name = config.get("objective", DEFAULT)
  if name not in _KINDS:
    raise ValueError(f"config.objective={name!r} is not a known objective; use one of {sorted(_KINDS)}")
  return name


def objective_class(config):
  module, _, cls = _KINDS[name_of(config)].partition(":")
  return getattr(importlib.import_module(module), cls)


def create(config, model, image_tokenizer, text_tokenizer):
  """The objective `config` selects, wired to the image tokenizer's encoder and the text ids."""
  cls = objective_class(config)
  return cls(config, model, image_tokenizer.encode, text_tokenizer.eos_id, text_tokenizer.sep_id)


def validate_config(config):
  objective_class(config).validate_config(config)
