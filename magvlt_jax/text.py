"""Text tokenizer: caption clean-up and a sentencepiece BPE trained on the training captions.

Conventions (SPEC section 3, official MAGVLT "ClipBPE"): no BOS; EOS appended, then padding with
EOS up to the text length; the length counts the EOS; an over-long caption is truncated to exactly
`max_length` ids and then has no EOS. A separator symbol is reserved for MixSel's concatenated texts.

BPE-dropout (training split only) is done here in Python over the model's own merge table, because
sentencepiece's sampling RNG is thread-local and cannot be re-seeded: ours is a pure function of
(caption, seed), so input pipelines stay deterministic and resumable with worker threads.
"""
import io
import logging
import os
import random
import re
from typing import Callable, Iterable, Sequence

from etils import epath
import numpy as np
import sentencepiece as spm

UNK_ID = 0
EOS_ID = 1
SEP_ID = 2
SEP_PIECE = "<sep>"
_WORD_PREFIX = "\u2581"  # sentencepiece's word-boundary marker

_LEADING_PUNCT = ",.!?*#:;~"
_SPACES = re.compile(r"\s+")


def clean_caption(s: str) -> str:
  """MAGVLT's pre_caption: lowercase, '-' and '/' to spaces, strip leading punctuation, collapse
  whitespace ("<person>" -> "person"; angle brackets are dropped so a caption cannot spell <sep>)."""
  if not isinstance(s, str):
    s = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else str(s)
  s = s.lower().replace("<person>", "person").replace("<", " ").replace(">", " ")
  s = s.replace("-", " ").replace("/", " ")
  s = _SPACES.sub(" ", s).strip()
  s = s.lstrip(_LEADING_PUNCT + " ")
  return s.rstrip("\n").strip()


class TextTokenizer:
  """sentencepiece BPE with EOS padding, BPE-dropout and decoding; see the module docstring."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    if self._sp.eos_id() != EOS_ID or self._sp.piece_to_id(SEP_PIECE) != SEP_ID:
      raise ValueError("sentencepiece model was not trained by magvlt_jax.text (expected eos id "
                       f"{EOS_ID} and {SEP_PIECE} id {SEP_ID}); retrain it with TextTokenizer.train")
    # Merge table for BPE-dropout: piece -> (id, score); higher score = earlier merge.
    self._pieces = {}
    for i in range(self._sp.get_piece_size()):
      if not (self._sp.is_control(i) or self._sp.is_unknown(i) or i == SEP_ID):
        self._pieces[self._sp.id_to_piece(i)] = (i, self._sp.get_score(i))

  # ------------------------------------------------------------------ construction
  @classmethod
  def train(cls, captions: Iterable[str], vocab_size: int, model_path: str | None = None,
            max_sentences: int = 2_000_000) -> "TextTokenizer":
    """Trains on cleaned captions; `vocab_size` is an upper bound (small corpora give fewer ids)."""
    sentences = []
    for c in captions:
      c = clean_caption(c)
      if c:
        sentences.append(c)
      if len(sentences) >= max_sentences:
        break
    if not sentences:
      raise ValueError("TextTokenizer.train: no non-empty captions to train on")
    if vocab_size < 8:
      raise ValueError(f"config.text.vocab_size={vocab_size} is too small (need >= 8)")
    proto = None
    for coverage in (1.0, 0.9995, 0.995):  # large corpora carry rare characters
      buf = io.BytesIO()
      try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=coverage, hard_vocab_limit=False,
            unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, pad_id=-1, user_defined_symbols=[SEP_PIECE],
            split_digits=True, minloglevel=2, num_threads=1)
        proto = buf.getvalue()
        break
      except RuntimeError as e:  # "Vocabulary size is smaller than required_chars"
        if "required_chars" not in str(e):
          raise
        logging.warning("sentencepiece: %s; retrying with character_coverage < %s", e, coverage)
    if proto is None:
      raise ValueError(f"config.text.vocab_size={vocab_size} is smaller than the number of distinct "
                       "characters in the captions; raise config.text.vocab_size")
    tok = cls(proto)
    if tok.vocab_size > vocab_size:
      raise ValueError(f"trained vocab {tok.vocab_size} > config.text.vocab_size={vocab_size}")
    if model_path:
      path = epath.Path(model_path)  # local or cloud (gs://) workdirs
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + f".tmp{os.getpid()}")
      tmp.write_bytes(proto)
      tmp.rename(path)  # a concurrent reader never sees half a model
    return tok

  @classmethod
  def load(cls, model_path: str) -> "TextTokenizer":
    path = epath.Path(model_path)
    if not path.exists():
      raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
    return cls(path.read_bytes())

  # ------------------------------------------------------------------ properties
  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def pad_id(self) -> int:
    return EOS_ID

  @property
  def sep_id(self) -> int:
    return SEP_ID

  # ------------------------------------------------------------------ encoding
  def encode_ids(self, caption: str, *, dropout: float = 0.0,
                 rng: np.random.Generator | None = None) -> list[int]:
    """Cleans and BPE-encodes one caption (no EOS)."""
    text = clean_caption(caption)
    if not text:
      return []
    if dropout <= 0.0:
      return self._sp.encode(text)
    if rng is None:
      raise ValueError("encode_ids: dropout > 0 needs an rng (np.random.Generator)")
    rnd = random.Random(int(rng.integers(2**63)))  # fast scalar draws, seeded by the caller
    ids = []
    for word in self._sp.normalize(text).replace(" ", _WORD_PREFIX).split(_WORD_PREFIX):
      if word:
        ids.extend(self._bpe_word(_WORD_PREFIX + word, dropout, rnd))
    return ids

  def _bpe_word(self, word: str, dropout: float, rnd: random.Random) -> list[int]:
    """BPE-dropout (Provilkov et al. 2020): at every step each applicable merge is dropped with
    probability `dropout`; the best remaining one (highest score, leftmost) is applied; the word
    is done when no merge remains."""
    symbols = list(word)
    pieces = self._pieces
    while len(symbols) > 1:
      best, best_score = -1, -np.inf
      for j in range(len(symbols) - 1):
        entry = pieces.get(symbols[j] + symbols[j + 1])
        if entry is not None and entry[1] > best_score and rnd.random() >= dropout:
          best, best_score = j, entry[1]
      if best < 0:
        break
      symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    ids = [pieces.get(s, (UNK_ID, 0.0))[0] for s in symbols]
    # sentencepiece emits one <unk> for a run of unknown characters
    return [i for j, i in enumerate(ids) if not (i == UNK_ID and j > 0 and ids[j - 1] == UNK_ID)]

  def encode_one(self, caption: str, max_length: int, *, dropout: float = 0.0,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """-> (ids int32 [max_length] EOS-padded, length counting the EOS; == max_length if cut)."""
    ids = self.encode_ids(caption, dropout=dropout, rng=rng)[:max_length]
    out = np.full((max_length,), EOS_ID, np.int32)
    out[:len(ids)] = ids
    return out, min(len(ids) + 1, max_length)

  def encode(self, captions: Sequence[str], max_length: int, *, dropout: float = 0.0,
             seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [B, max_length] padded with eos_id, lengths int32 [B] counting the EOS)."""
    if isinstance(captions, str):
      raise TypeError("TextTokenizer.encode takes a list of captions; use encode_one for one")
    rng = np.random.default_rng(seed) if dropout > 0.0 else None
    ids = np.full((len(captions), max_length), EOS_ID, np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    for i, c in enumerate(captions):
      ids[i], lengths[i] = self.encode_one(c, max_length, dropout=dropout, rng=rng)
    return ids, lengths

  def encode_pair(self, first: str, second: str, max_length: int) -> tuple[np.ndarray, int]:
    """Two captions joined by the separator (MixSel text context), EOS-padded."""
    a, b = self.encode_ids(first), self.encode_ids(second)
    ids = (a + [SEP_ID] + b)[:max_length]
    out = np.full((max_length,), EOS_ID, np.int32)
    out[:len(ids)] = ids
    return out, min(len(ids) + 1, max_length)

  # ------------------------------------------------------------------ decoding
  def decode(self, ids) -> list[str]:
    """ids [B, T] (or [T]) -> captions, each cut at its first EOS."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
      arr = arr[None]
    out = []
    for row in arr.tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      row = [i for i in row if 0 <= i < self.vocab_size]
      out.append(self._sp.decode(row))
    return out


def spm_model_path(config, workdir: str) -> str:
  return config.text.spm_model or os.path.join(workdir, "text", "spm.model")


# config.text.kind -> the tokenizer family. "sentencepiece": trained on the run's captions (or
# config.text.spm_model); "clip_bpe": the official MAGVLT ClipBPE over CLIP's files (text_clip.py).
TEXT_KINDS = ("sentencepiece", "clip_bpe")


def text_kind(config) -> str:
  kind = config.text.get("kind", "sentencepiece")
  if kind not in TEXT_KINDS:
    raise ValueError(f"config.text.kind={kind!r} is not a known text tokenizer; use one of {list(TEXT_KINDS)}")
  return kind


def clip_bpe_files(config, workdir: str) -> tuple[str, str]:
  """(vocab, merges) for clip_bpe: config.text.clip_vocab (+ clip_merges), else WORKDIR/text/
  clip-vocab.json + clip-merges.txt, else WORKDIR/text/bpe_simple_vocab_16e6.txt.gz (merges "")."""
  from magvlt_jax import text_clip  # pylint: disable=import-outside-toplevel
  vocab = config.text.get("clip_vocab", "")
  if vocab:
    return vocab, config.text.get("clip_merges", "")
  d = os.path.join(workdir, "text")
  if os.path.exists(os.path.join(d, text_clip.VOCAB_FILE)):
    return os.path.join(d, text_clip.VOCAB_FILE), os.path.join(d, text_clip.MERGES_FILE)
  gz = os.path.join(d, text_clip.CLIP_GZ_FILE)
  if os.path.exists(gz):
    return gz, ""
  raise FileNotFoundError(
      f"config.text.kind='clip_bpe' needs CLIP's BPE files: set config.text.clip_vocab (+ "
      f"config.text.clip_merges), or put {text_clip.VOCAB_FILE} + {text_clip.MERGES_FILE} or "
      f"{text_clip.CLIP_GZ_FILE} into {d}")


def load_tokenizer(config, workdir: str, *, for_data: bool = False):
  """The text tokenizer of a trained run (never trains): what the sampler and evaluation use.
  clip_bpe with `for_data`: captions get the official datasets' pre_caption first (prompts in
  the official sampling scripts do not)."""
  if text_kind(config) == "clip_bpe":
    from magvlt_jax import text_clip  # pylint: disable=import-outside-toplevel
    return text_clip.ClipBPETokenizer.load(*clip_bpe_files(config, workdir), clean=for_data)
  return TextTokenizer.load(spm_model_path(config, workdir))


def get_or_train_tokenizer(config, workdir: str,
                           captions_fn: Callable[[], Iterable[str]] | None = None) -> TextTokenizer:
  """Loads config.text.spm_model or WORKDIR/text/spm.model, or trains one there from
  `captions_fn()` (default: the training captions of config.data); for config.text.kind=
  'clip_bpe' loads the official ClipBPE (load_tokenizer)."""
  limit = int(config.text.vocab_size)
  if text_kind(config) == "clip_bpe":  # a fixed vocabulary: loaded, never trained
    tok = load_tokenizer(config, workdir, for_data=True)  # the trainer's data pipeline
    if tok.vocab_size > limit:
      raise ValueError(f"ClipBPE vocabulary has {tok.vocab_size} ids > config.text.vocab_size={limit}")
    return tok
  path = spm_model_path(config, workdir)
  if epath.Path(path).exists():
    tok = TextTokenizer.load(path)
    logging.info("text tokenizer: loaded %s (%d ids)", path, tok.vocab_size)
  else:
    if config.text.spm_model:
      raise FileNotFoundError(f"config.text.spm_model={config.text.spm_model!r} does not exist")
    if captions_fn is None:
      from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
      captions_fn = lambda: pipeline.caption_iterator(config, config.data.train_split, workdir=workdir)
    max_sentences = int(config.text.get("max_training_sentences", 2_000_000))
    tok = TextTokenizer.train(captions_fn(), limit, path, max_sentences=max_sentences)
    logging.info("text tokenizer: trained %s (%d ids)", path, tok.vocab_size)
  if tok.vocab_size > limit:
    raise ValueError(f"text tokenizer {path} has {tok.vocab_size} ids > config.text.vocab_size="
                     f"{limit}; raise config.text.vocab_size or retrain the tokenizer")
  return tok
