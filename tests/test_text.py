"""Text tokenizer: clean-up, EOS/padding/length, truncation, BPE-dropout, decoding, training."""
import os

import numpy as np
import pytest

from magvlt_jax import text
from magvlt_jax.configs_util import load_config
from magvlt_jax.data import synthetic

CAPTIONS = [c for _, _, caps, _ in synthetic.examples(300, seed=0) for c in caps]
CAPTIONS += ["A man riding a horse on the beach.", "two dogs playing with a frisbee",
             "a plate of food with broccoli and rice"]


@pytest.fixture(scope="module")
def tok():
  return text.TextTokenizer.train(CAPTIONS, vocab_size=160)


def test_clean_caption():
  assert text.clean_caption("  ,.!A  Dog-on the/Beach!!  \n") == "a dog on the beach!!"
  assert text.clean_caption("#:;~ Hello   World") == "hello world"
  assert text.clean_caption("a <person> rides") == "a person rides"
  assert text.clean_caption("...") == ""
  assert text.clean_caption(b"Bytes OK") == "bytes ok"


def test_special_ids_and_vocab_bound(tok):
  assert tok.eos_id == tok.pad_id == text.EOS_ID
  assert tok.sep_id == text.SEP_ID
  assert tok.vocab_size <= 160
  ids = tok.encode_ids("a red circle in the top left")
  assert text.EOS_ID not in ids and text.SEP_ID not in ids and ids  # no BOS/EOS inside


def test_eos_padding_and_length(tok):
  ids, lengths = tok.encode(["a red circle in the center", ""], max_length=16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32 and lengths.dtype == np.int32
  n = len(tok.encode_ids("a red circle in the center"))
  assert lengths[0] == n + 1  # counts the EOS
  assert np.all(ids[0, n:] == tok.eos_id) and np.all(ids[0, :n] != tok.eos_id)
  assert lengths[1] == 1 and np.all(ids[1] == tok.eos_id)  # empty caption: just EOS


def test_truncation(tok):
  long = " ".join(["a red circle in the top left"] * 10)
  ids, lengths = tok.encode([long], max_length=8)
  assert lengths[0] == 8 and tok.eos_id not in ids[0].tolist()  # cut: no EOS, length == T
  assert ids[0].tolist() == tok.encode_ids(long)[:8]


def test_decode_round_trip(tok):
  caps = ["A red circle in the top-left.", "there is a blue square in the center of the image"]
  ids, _ = tok.encode(caps, max_length=24)
  assert tok.decode(ids) == [text.clean_caption(c) for c in caps]
  junk = ids.copy()
  junk[0, 10:] = ids[1, :14]  # anything after the first EOS is ignored
  assert tok.decode(junk)[0] == text.clean_caption(caps[0])


def test_bpe_dropout_varies_only_when_enabled_and_is_seeded(tok):
  cap = ["there is a purple triangle in the bottom middle of the image"]
  plain = {tuple(tok.encode(cap, 24, seed=s)[0][0]) for s in range(20)}
  assert len(plain) == 1
  dropped = {tuple(tok.encode(cap, 24, dropout=0.1, seed=s)[0][0]) for s in range(20)}
  assert len(dropped) > 3
  a = tok.encode(cap, 24, dropout=0.1, seed=7)[0]
  assert np.array_equal(a, tok.encode(cap, 24, dropout=0.1, seed=7)[0])
  # every dropout encoding still decodes to the same text
  for s in range(10):
    assert tok.decode(tok.encode(cap, 24, dropout=0.1, seed=s)[0]) == cap


def test_python_bpe_matches_sentencepiece(tok):
  # our BPE (used for dropout) with no dropout reproduces sentencepiece's own encoding
  rng = np.random.default_rng(0)
  for cap in CAPTIONS[::7] + ["unknown chars: zq 123 ünï"]:
    assert tok.encode_ids(cap, dropout=1e-12, rng=rng) == tok.encode_ids(cap)


def test_encode_pair_uses_separator(tok):
  ids, length = tok.encode_pair("a red circle", "a blue square", 20)
  a = tok.encode_ids("a red circle")
  assert ids[len(a)] == tok.sep_id and length == len(a) + 1 + len(tok.encode_ids("a blue square")) + 1


def test_vocab_limit_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    text.TextTokenizer.train(CAPTIONS, vocab_size=12)  # fewer ids than distinct characters
  with pytest.raises(ValueError, match="no non-empty captions"):
    text.TextTokenizer.train(["", " ..."], vocab_size=100)


def test_get_or_train_tokenizer_trains_then_loads(tmp_path):
  config = load_config("configs/magvlt.py:tiny")
  tok = text.get_or_train_tokenizer(config, str(tmp_path), lambda: iter(CAPTIONS))
  path = tmp_path / "text" / "spm.model"
  assert path.exists() and tok.vocab_size <= config.text.vocab_size
  again = text.get_or_train_tokenizer(config, str(tmp_path), lambda: iter(["unused"]))
  assert again.model_proto == tok.model_proto
  config.text.vocab_size = 16
  with pytest.raises(ValueError, match="config.text.vocab_size"):
    text.get_or_train_tokenizer(config, str(tmp_path))
  config.text.spm_model = os.path.join(str(tmp_path), "missing.model")
  with pytest.raises(FileNotFoundError, match="spm_model"):
    text.get_or_train_tokenizer(config, str(tmp_path))
