"""Writes tests/data/clip_bpe_subset/{clip-vocab.json,clip-merges.txt}: the part of CLIP's BPE
files that the captions of clip_bpe_official_ids.json use, so the official-ids test runs in CI
without the full files (CLIP's vocabulary and merges are MIT, (c) 2021 OpenAI; kept in the files).

  python tests/data/make_clip_bpe_subset.py DIR_WITH_clip-vocab.json_AND_clip-merges.txt

Kept: all 512 byte symbols (with and without </w>, so "is this character in the vocabulary" has
the same answer for every character), <|startoftext|>, <|endoftext|>, and every merge that fires
while the full tokenizer encodes the captions (plus the token it makes), each with its original
id and in its original rank order. Why that gives the same ids: BPE applies, at each step, the
lowest-ranked merge among the word's adjacent pairs. A merge that fires with the full table is in
the subset, and the subset's pairs are a subset of the full table's, so the lowest-ranked pair
present is the same one at every step: the same merges fire in the same order, and the tokens
keep their ids. The test checks the result against the recorded official ids anyway.
"""
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)
from magvlt_jax import text_clip as tc  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "clip_bpe_subset")
NOTICE = "#version: 0.2 subset of OpenAI CLIP bpe_simple_vocab_16e6 (MIT License, Copyright (c) 2021 OpenAI)"


def fired_merges(tok: tc.ClipBPETokenizer, word: str):
  """The merges the BPE loop applies to `word`, in order (a replay of ClipBPETokenizer._bpe)."""
  symbols, fired = list(word), []
  symbols[-1] += tc.SUFFIX
  while len(symbols) > 1:
    pairs = [(tok.ranks.get(p), j) for j, p in enumerate(zip(symbols, symbols[1:]))]
    pairs = [(r, j) for r, j in pairs if r is not None]
    if not pairs:
      break
    _, j = min(pairs)
    fired.append((symbols[j], symbols[j + 1]))
    symbols[j:j + 2] = [symbols[j] + symbols[j + 1]]
  return fired


def subset(full_dir: str, captions, context_length: int):
  tok = tc.ClipBPETokenizer.load(os.path.join(full_dir, tc.VOCAB_FILE),
                                 os.path.join(full_dir, tc.MERGES_FILE))
  for c in captions:
    tok.encode_one(c, context_length)  # fills tok._cache with every word it tokenized
  used = {m for word in tok._cache for m in fired_merges(tok, word)}  # pylint: disable=protected-access
  merges = sorted(used, key=tok.ranks.__getitem__)
  symbols = list(tc.bytes_to_unicode().values())
  keep = symbols + [s + tc.SUFFIX for s in symbols] + ["".join(m) for m in merges] + [tc.SOT, tc.EOT]
  return {t: tok.vocab[t] for t in keep}, merges


def main(full_dir: str):
  with open(os.path.join(HERE, "clip_bpe_official_ids.json"), encoding="utf-8") as f:
    ref = json.load(f)
  vocab, merges = subset(full_dir, [c["caption"] for c in ref["cases"]], ref["context_length"])
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, tc.VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False, indent=0, sort_keys=False)
    f.write("\n")
  with open(os.path.join(OUT, tc.MERGES_FILE), "w", encoding="utf-8") as f:
    f.write("\n".join([NOTICE] + [" ".join(m) for m in merges]) + "\n")
  print(f"{len(vocab)} vocabulary entries, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
  main(sys.argv[1])
