"""The official MAGVLT "ClipBPE" text tokenizer, in pure Python (config.text.kind="clip_bpe").

The released checkpoints were trained with HF `tokenizers`' CharBPETokenizer over CLIP's vocabulary
and merges. That is NOT CLIP's own tokenizer (notes/official_magvlt.md section 6):
  normalizer     BertNormalizer(lowercase=False): drop NUL / U+FFFD / control characters, map
                 whitespace to ' ', put spaces around CJK ideographs; then Lowercase (accents kept);
  pre-tokenizer  BertPreTokenizer: split on whitespace, every punctuation character its own word
                 ("dog's" -> dog ' s);
  model          BPE by merge rank over characters (no byte-level map), the last character of a
                 word carries the `</w>` suffix; a character with no vocabulary entry is an error
                 (unk "[UNK]" is not in the vocabulary), and the official `get_input` then retries
                 with the caption ASCII-stripped;
  ids            no BOS; EOS = pad = 49407 (`<|endoftext|>`); EOS-padded to the text length; the
                 length counts the EOS; an over-long caption is cut to exactly the text length,
                 without an EOS. The MixSel separator is the id of the bare "|" symbol (91).
Files: a `clip-vocab.json` + `clip-merges.txt` pair (HF format) or CLIP's
`bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is rebuilt as CLIP does), given as
config.text.clip_vocab (+ config.text.clip_merges) or found in WORKDIR/text/.
"""
import functools
import gzip
import json
import os
import random
import re
import unicodedata
from typing import Dict, List, Sequence, Tuple

import numpy as np

EOT = "<|endoftext|>"
SOT = "<|startoftext|>"
VOCAB_FILE, MERGES_FILE = "clip-vocab.json", "clip-merges.txt"
CLIP_GZ_FILE = "bpe_simple_vocab_16e6.txt.gz"
SUFFIX = "</w>"
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_ASCII_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_SPACES = re.compile(r"\s{2,}")


class UnknownCharacterError(ValueError):
  """A character with no vocabulary entry (HF: "Unk token `[UNK]` not found in the vocabulary")."""


def pre_caption(caption: str) -> str:
  """The official datasets' caption clean-up (TokenizerUtils.pre_caption)."""
  caption = (caption.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
             .replace("<person>", "person").replace("< person >", "person"))
  return _SPACES.sub(" ", caption).rstrip("\n")


def _is_control(c: str) -> bool:
  return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_whitespace(c: str) -> bool:
  return c in "\t\n\r" or c.isspace()


def normalize(text: str) -> str:
  """BertNormalizer(clean_text, handle_chinese_chars, no accent stripping) + Lowercase."""
  out = []
  for c in text:
    if c in ("\0", "\ufffd") or _is_control(c):
      continue
    if _is_whitespace(c):
      out.append(" ")
    elif any(lo <= ord(c) <= hi for lo, hi in _CJK):
      out.extend((" ", c, " "))
    else:
      out.append(c)
  return "".join(out).lower()


def _is_punct(c: str) -> bool:
  return c in _ASCII_PUNCT or unicodedata.category(c).startswith("P")


def pre_tokenize(text: str) -> List[str]:
  """BertPreTokenizer: whitespace splits (removed), punctuation characters isolated."""
  words, cur = [], []
  for c in text:
    if _is_whitespace(c) or _is_punct(c):
      if cur:
        words.append("".join(cur))
        cur = []
      if not _is_whitespace(c):
        words.append(c)
    else:
      cur.append(c)
  if cur:
    words.append("".join(cur))
  return words


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
  """CLIP's byte -> printable-symbol table (used here only to rebuild the vocabulary order)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def read_files(vocab_path: str, merges_path: str = "") -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """(token -> id, merges in rank order) from clip-vocab.json + clip-merges.txt, or from CLIP's
  bpe_simple_vocab_16e6.txt.gz (vocab: 256 byte symbols, the same with </w>, one per merge, then
  <|startoftext|>, <|endoftext|>)."""
  for p in (vocab_path, merges_path):
    if p and not os.path.exists(p):
      raise FileNotFoundError(f"ClipBPE file not found: {p}")
  if vocab_path.endswith(".gz"):
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + SUFFIX for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges
  if not merges_path:
    raise ValueError("ClipBPE: a clip-vocab.json needs its clip-merges.txt (config.text.clip_merges)")
  with open(vocab_path, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_path, encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")
              if line and not line.startswith("#version")]
  return vocab, merges


class ClipBPETokenizer:
  """Same interface as text.TextTokenizer (encode_ids / encode_one / encode / encode_pair /
  decode / vocab_size / eos_id / pad_id / sep_id)."""

  def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], *,
               clean: bool = False):
    # clean: apply pre_caption first, as the official datasets do (get_input(pre_proc=...));
    # the official sampling scripts tokenize prompts raw (clean=False).
    self.clean = clean
    if EOT not in vocab:
      raise ValueError(f"ClipBPE vocabulary has no {EOT} token")
    self.vocab = dict(vocab)
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.inverse = {i: t for t, i in self.vocab.items()}
    self._eos = self.vocab[EOT]
    self._cache: Dict[str, List[int]] = {}
    # MaskGITModel.sep_token_id = token_to_id("|"): the bare symbol (91), not the word "|</w>".
    self._sep = self.vocab["|"]

  @classmethod
  def load(cls, vocab_path: str, merges_path: str = "", *, clean: bool = False) -> "ClipBPETokenizer":
    return cls(*read_files(vocab_path, merges_path), clean=clean)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._eos

  @property
  def sep_id(self) -> int:
    return self._sep

  # ------------------------------------------------------------------ BPE
  def _bpe(self, word: str, dropout: float, rnd) -> List[int]:
    symbols = list(word)
    symbols[-1] += SUFFIX
    missing = [s for s in symbols if s not in self.vocab]
    if missing:
      raise UnknownCharacterError(f"ClipBPE: character {missing[0]!r} is not in the vocabulary")
    while len(symbols) > 1:
      best, best_rank = -1, None
      for j in range(len(symbols) - 1):
        rank = self.ranks.get((symbols[j], symbols[j + 1]))
        if rank is None or (dropout > 0.0 and rnd.random() < dropout):
          continue  # BPE-dropout: each applicable merge is dropped with probability `dropout`
        if best_rank is None or rank < best_rank:
          best, best_rank = j, rank
      if best < 0:
        break
      symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    return [self.vocab[s] for s in symbols]

  def _encode_raw(self, text: str, dropout: float, rnd) -> List[int]:
    ids = []
    for word in pre_tokenize(normalize(text)):
      if dropout > 0.0:
        ids.extend(self._bpe(word, dropout, rnd))
      else:
        if word not in self._cache:
          self._cache[word] = self._bpe(word, 0.0, None)
        ids.extend(self._cache[word])
    return ids

  def encode_ids(self, caption: str, *, dropout: float = 0.0,
                 rng: np.random.Generator | None = None) -> List[int]:
    """BPE ids of one caption (no EOS), as the official get_input: on a character outside the
    vocabulary the caption is retried ASCII-stripped."""
    if dropout > 0.0 and rng is None:
      raise ValueError("encode_ids: dropout > 0 needs an rng (np.random.Generator)")
    rnd = random.Random(int(rng.integers(2**63))) if dropout > 0.0 else None
    prep = pre_caption if self.clean else (lambda c: c)
    try:
      return self._encode_raw(prep(caption), dropout, rnd)
    except UnknownCharacterError:
      return self._encode_raw(prep(caption.encode("ascii", "ignore").decode()), dropout, rnd)

  def _pad(self, ids: List[int], max_length: int) -> Tuple[np.ndarray, int]:
    ids = ids[:max_length]
    out = np.full((max_length,), self._eos, np.int32)
    out[:len(ids)] = ids
    return out, min(len(ids) + 1, max_length)

  def encode_one(self, caption: str, max_length: int, *, dropout: float = 0.0,
                 rng: np.random.Generator | None = None) -> Tuple[np.ndarray, int]:
    """-> (ids int32 [max_length] EOS-padded, length counting the EOS; == max_length if cut)."""
    return self._pad(self.encode_ids(caption, dropout=dropout, rng=rng), max_length)

  def encode(self, captions: Sequence[str], max_length: int, *, dropout: float = 0.0,
             seed: int | None = None) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(captions, str):
      raise TypeError("ClipBPETokenizer.encode takes a list of captions; use encode_one for one")
    rng = np.random.default_rng(seed) if dropout > 0.0 else None
    rows = [self.encode_one(c, max_length, dropout=dropout, rng=rng) for c in captions]
    ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, max_length), np.int32)
    return ids, np.asarray([r[1] for r in rows], np.int32)

  def encode_pair(self, first: str, second: str, max_length: int) -> Tuple[np.ndarray, int]:
    """Two captions joined by the "|" separator (MixSel text context), EOS-padded."""
    return self._pad(self.encode_ids(first) + [self._sep] + self.encode_ids(second), max_length)

  def decode(self, ids) -> List[str]:
    """ids [B, T] (or [T]) -> captions, each cut at its first EOS (HF BPEDecoder)."""
    rows = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
      rows = [rows]
    out = []
    for row in (list(np.asarray(r).tolist()) for r in rows):
      if self._eos in row:
        row = row[:row.index(self._eos)]
      tokens = [self.inverse[i] for i in row if i in self.inverse]
      out.append("".join(t.replace(SUFFIX, " ") for t in tokens).strip())
    return out
