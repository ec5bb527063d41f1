"""The official MAGVLT ClipBPE tokenizer: semantics on a micro CLIP-format vocabulary (always), and
ids identical to the official HF CharBPETokenizer for 36 captions (always, on a committed subset
of CLIP's files; on the full files where they exist)."""
import gzip
import json
import os

import numpy as np
import pytest

from magvlt_jax import configs_util
from magvlt_jax import text as text_lib
from magvlt_jax import text_clip as tc

_HERE = os.path.dirname(os.path.abspath(__file__))
_OFFICIAL_DIR = os.environ.get("MAGVLT_CLIP_BPE_DIR",
                               "/work/shared/anchors/magvlt_official/magvlt/datamodules")
MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


def sym(c, end=False):
  """Id of a byte symbol in CLIP's order (printable ASCII '!' .. '~' first)."""
  return ord(c) - 33 + (256 if end else 0)


@pytest.fixture(scope="module")
def micro_gz(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip") / tc.CLIP_GZ_FILE)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(["#version: 0.2"] + MERGES) + "\n")
  return path


@pytest.fixture(scope="module")
def tok(micro_gz):
  return tc.ClipBPETokenizer.load(micro_gz)


def test_gz_vocabulary_order_and_specials(tok):
  # 256 byte symbols, the same with </w>, one per merge, then <|startoftext|>, <|endoftext|>.
  assert tok.vocab_size == 512 + len(MERGES) + 2
  assert tok.vocab["cat</w>"] == 513 and tok.vocab[tc.SOT] == 516
  assert tok.eos_id == tok.pad_id == 517
  assert tok.sep_id == 91  # the bare "|" symbol, as the official token_to_id("|")


def test_punctuation_split_word_ends_and_eos(tok):
  ids, n = tok.encode_one("Cat's DOG", 8)
  want = [513, sym("'", True), sym("s", True), 515]
  assert ids.tolist() == want + [517] * 4 and n == 5  # the length counts the EOS
  assert tok.encode_ids("cats") == [512, sym("t"), sym("s", True)]  # "cat</w>" needs the word end
  assert tok.decode(ids) == ["cat ' s dog"]


def test_truncation_has_no_eos_and_empty_is_eos_only(tok):
  ids, n = tok.encode_one("cat dog cat dog", 3)
  assert ids.tolist() == [513, 515, 513] and n == 3
  ids, n = tok.encode_one("", 4)
  assert ids.tolist() == [517] * 4 and n == 1


def test_unknown_character_retries_ascii_stripped(tok):
  assert tok.encode_ids("cat \U0001F600 dog") == [513, 515]  # emoji: not a byte symbol
  # The retry strips the character without a space: "catdog" is one word.
  assert tok.encode_ids("cat\u4e2ddog") == [512, sym("t"), 515]
  assert tok.encode_ids("caf\u00e9") == [512, sym("f"), tok.vocab["\u00e9</w>"]]  # a byte symbol


def test_normalizer_controls_whitespace_and_case(tok):
  assert tc.normalize("A\tB\x07C\x00\ufffdD\u00c9") == "a bcd\u00e9"  # accents kept
  assert tc.pre_tokenize("a,b  c!!") == ["a", ",", "b", "c", "!", "!"]
  assert tc.pre_tokenize("x$y|z\u2014w") == ["x", "$", "y", "|", "z", "\u2014", "w"]


def test_dropout_is_seeded_and_only_splits(tok):
  a, _ = tok.encode(["cat dog"] * 8, 6, dropout=0.5, seed=3)
  b, _ = tok.encode(["cat dog"] * 8, 6, dropout=0.5, seed=3)
  np.testing.assert_array_equal(a, b)
  assert {tuple(r[:2]) for r in a.tolist()} != {(513, 515)}  # some rows are split
  assert tok.decode(a) == ["cat dog"] * 8  # splits never change the text


def test_pair_uses_the_separator(tok):
  ids, n = tok.encode_pair("cat", "dog", 6)
  assert ids.tolist()[:4] == [513, 91, 515, 517] and n == 4


def test_pre_caption_matches_the_official_cleanup():
  assert tc.pre_caption(",.A Red-haired  girl/boy <person>\n") == "a red haired girl boy person"


def test_config_selects_clip_bpe_from_the_workdir(micro_gz, tmp_path):
  config = configs_util.load_config("configs/magvlt.py:official_base")
  assert config.text.kind == "clip_bpe"
  os.makedirs(tmp_path / "text")
  with open(micro_gz, "rb") as src, open(tmp_path / "text" / tc.CLIP_GZ_FILE, "wb") as dst:
    dst.write(src.read())
  tok = text_lib.get_or_train_tokenizer(config, str(tmp_path))
  assert isinstance(tok, tc.ClipBPETokenizer) and tok.eos_id == 517
  # The data pipeline's tokenizer applies pre_caption ("-" -> space), the sampler's does not.
  assert tok.encode_ids("cat-dog") == [513, 515]
  assert text_lib.load_tokenizer(config, str(tmp_path)).encode_ids("cat-dog") == [
      513, sym("-", True), 515]
  config.text.kind = "wordpiece"
  with pytest.raises(ValueError, match="config.text.kind"):
    configs_util.validate_config(config)
  config.text.kind = "clip_bpe"
  with pytest.raises(FileNotFoundError, match="clip_vocab"):
    text_lib.load_tokenizer(config, str(tmp_path / "elsewhere"))


_SUBSET_DIR = os.path.join(_HERE, "data", "clip_bpe_subset")


@pytest.mark.parametrize("files", ["subset", "full"])
def test_ids_equal_the_official_tokenizer(files):
  """Ids recorded from the official HF CharBPETokenizer (clip_bpe_official_ids.json, 36 captions).

  CI has neither torch nor ../shared, and CLIP's files ship only in torch-dependent wheels
  (open_clip, clip-anytorch), so the always-run case reads tests/data/clip_bpe_subset: the 512
  byte symbols, the specials and the 304 merges (with their original ids and rank order) that
  fire on these captions, cut from CLIP's MIT-licensed files by tests/data/make_clip_bpe_subset.py
  (its docstring has the argument why a BPE over the fired merges gives the same ids; the official
  HF CharBPETokenizer on the subset files gives the recorded ids for all 36 captions too). The
  "full" case reads CLIP's complete clip-vocab.json / clip-merges.txt where they exist
  (MAGVLT_CLIP_BPE_DIR or ../shared/anchors) and checks that the subset is what the script cuts.
  """
  with open(os.path.join(_HERE, "data", "clip_bpe_official_ids.json"), encoding="utf-8") as f:
    ref = json.load(f)
  directory = _SUBSET_DIR if files == "subset" else _OFFICIAL_DIR
  if not os.path.exists(os.path.join(directory, tc.VOCAB_FILE)):
    pytest.skip("CLIP's full clip-vocab.json / clip-merges.txt not available (set MAGVLT_CLIP_BPE_DIR)")
  tok = tc.ClipBPETokenizer.load(os.path.join(directory, tc.VOCAB_FILE),
                                 os.path.join(directory, tc.MERGES_FILE))
  assert len(ref["cases"]) >= 30
  for case in ref["cases"]:
    ids, n = tok.encode_one(case["caption"], ref["context_length"])
    assert (ids[:n].tolist(), n) == (case["ids"], case["n_txt"]), case["caption"]
  assert ref["cases"][0]["ids"][:4] == [320, 2660, 705, 539]  # the notes' example
  if files == "full":
    from tests.data import make_clip_bpe_subset as cut
    vocab, merges = cut.subset(directory, [c["caption"] for c in ref["cases"]], ref["context_length"])
    assert (vocab, merges) == tc.read_files(os.path.join(_SUBSET_DIR, tc.VOCAB_FILE),
                                            os.path.join(_SUBSET_DIR, tc.MERGES_FILE))
