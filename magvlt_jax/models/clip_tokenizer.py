"""The CLIP byte-level BPE tokenizer (lower-cased, `</w>` word ends, 77-token contexts).

Reads a merges file in the `bpe_simple_vocab_16e6.txt.gz` format (a header line, then one
"left right" merge per line, gzip or plain text). That file ships in the open_clip and
clip-anytorch wheels; `find_bpe_file()` looks there. Vocabulary order (ids): the 256 byte
symbols, the same with `</w>`, one token per merge, then <|startoftext|>, <|endoftext|>
(49408 ids with the standard file, which uses its first 48894 merges).
"""
import functools
import gzip
import html
import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

try:  # \p{L} / \p{N} classes as in the reference tokenizer; `re` fallback otherwise
  import regex as _re
  _PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
              r"|[^\s\p{L}\p{N}]+")
except ImportError:  # pragma: no cover - regex ships with most installs
  import re as _re
  _PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d"
              r"|[^\s\w]+|_+")

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
STANDARD_MERGES = 49152 - 256 - 2
_BUNDLES = (("open_clip", "bpe_simple_vocab_16e6.txt.gz"), ("clip", "bpe_simple_vocab_16e6.txt.gz"))


@functools.lru_cache(maxsize=1)
def byte_symbols() -> Dict[int, str]:
  """Reversible byte -> printable unicode char map (whitespace/control bytes moved past 255)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def find_bpe_file() -> Optional[str]:
  """The merges file bundled with an installed open_clip / clip package, if any."""
  for package, name in _BUNDLES:
    spec = importlib.util.find_spec(package)
    if spec and spec.submodule_search_locations:
      for folder in spec.submodule_search_locations:
        path = os.path.join(folder, name)
        if os.path.exists(path):
          return path
  return None


def _clean(text: str) -> str:
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class CLIPTokenizer:
  """encode/decode/tokenize with CLIP's BPE (see module doc)."""

  def __init__(self, bpe_path: str, max_merges: int = STANDARD_MERGES):
    opener = gzip.open if bpe_path.endswith(".gz") else open
    with opener(bpe_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:max_merges + 1] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{bpe_path}: merge lines must hold two symbols, got {bad[:3]}")
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.decoder = {i: tok for tok, i in self.encoder.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_decoder = {c: b for b, c in byte_symbols().items()}
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self._pattern = _re.compile(_PATTERN, _re.IGNORECASE)
    self._cache = {SOT: SOT, EOT: EOT}

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def bpe(self, token: str) -> str:
    """Space-separated BPE symbols of one pre-token (already byte-mapped)."""
    if token in self._cache:
      return self._cache[token]
    word: Tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    out = " ".join(word)
    self._cache[token] = out
    return out

  def encode(self, text: str) -> List[int]:
    table = byte_symbols()
    ids = []
    for piece in self._pattern.findall(_clean(text)):
      mapped = "".join(table[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self.bpe(mapped).split(" "))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    special = {self.sot_id, self.eot_id}
    text = "".join(self.decoder[int(i)] for i in ids if int(i) not in special)
    # "</w>" ends a word: split there, map symbols back to bytes, join words with spaces.
    words = [bytearray(self.byte_decoder[c] for c in w) for w in text.split("</w>")]
    return " ".join(w.decode("utf-8", errors="replace") for w in words if w)

  def tokenize(self, texts: Sequence[str], context_length: int = 77,
               truncate: bool = True) -> np.ndarray:
    """int32 [B, context_length]: SOT, tokens, EOT, zero padding (EOT kept when truncating)."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > context_length:
        if not truncate:
          raise ValueError(f"text {text[:40]!r}... has {len(ids)} tokens > {context_length}")
        ids = ids[:context_length - 1] + [self.eot_id]
      out[row, :len(ids)] = ids
    return out
