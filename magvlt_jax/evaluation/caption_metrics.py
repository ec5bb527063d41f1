"""Captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap 1.2.

Scores are exactly those of pycocoevalcap's `COCOEvalCap.evaluate` (PTB tokenisation, then
Bleu(4) / Meteor / Rouge / Cider / Spice on the tokenised captions), returned in [0, 1] (CIDEr in
[0, 10]) as plain floats. Papers usually print them x100.

Java is needed by the PTB tokenizer (bundled CoreNLP 3.4.1), METEOR 1.5 and SPICE.
SPICE also needs Stanford CoreNLP 3.6.0 (`stanford-corenlp-3.6.0.jar` and
`stanford-corenlp-3.6.0-models.jar`), which pycocoevalcap downloads on first use; we never
download: pass the jar (or the folder holding both jars) as `spice_corenlp_jar`
(config.eval.spice_corenlp_jar) or SPICE is reported as skipped.

pycocoevalcap writes temporary files into its own package folder (tokenizer, SPICE). When that
folder is read-only (a system-wide install), the affected sub-packages are run from a "shadow"
copy in a temporary folder: the .py files are copied and the jars / data are symlinked.
"""
import atexit
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Dict, Mapping, Optional, Sequence

JAVA_HINT = ("Java is needed for PTB tokenisation, METEOR and SPICE (pycocoevalcap). Install a "
             "JRE, e.g. `apt-get install openjdk-17-jre-headless`, and put `java` on PATH.")
CORENLP_JAR = "stanford-corenlp-3.6.0.jar"
CORENLP_MODELS_JAR = "stanford-corenlp-3.6.0-models.jar"
METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")


class JavaNotFoundError(RuntimeError):
  """Raised when `java` is not on PATH (the message says what to install)."""


def check_java() -> str:
  """Returns the path of `java`; raises JavaNotFoundError with an install hint when absent."""
  java = shutil.which("java")
  if java is None:
    raise JavaNotFoundError(JAVA_HINT)
  return java


def pycocoevalcap_dir() -> str:
  try:
    import pycocoevalcap  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("caption metrics need pycocoevalcap: `pip install -e .[eval]` "
                      "(or `pip install pycocoevalcap==1.2`)") from e
  return list(pycocoevalcap.__path__)[0]


def resolve_corenlp_jars(spice_corenlp_jar: str):
  """Returns (corenlp_jar, models_jar) from a jar path or a folder; clear error when missing."""
  path = os.path.abspath(os.path.expanduser(spice_corenlp_jar))
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  jar = os.path.join(folder, CORENLP_JAR) if os.path.isdir(path) else path
  models = os.path.join(folder, CORENLP_MODELS_JAR)
  for f in (jar, models):
    if not os.path.isfile(f):
      raise FileNotFoundError(
          f"config.eval.spice_corenlp_jar={spice_corenlp_jar!r}: {f} not found. SPICE needs "
          f"{CORENLP_JAR} and {CORENLP_MODELS_JAR} side by side (both are in "
          "stanford-corenlp-full-2015-12-09.zip from nlp.stanford.edu).")
  return jar, models


def _shadow_subpackage(root: str, package: str, name: str, extra_lib=()) -> str:
  """Copies pycocoevalcap/<name> to root/<package>/<name>: .py files copied, the rest symlinked.

  Returns the dotted module prefix to import it from (`package` is a private top-level name).
  """
  src = os.path.join(pycocoevalcap_dir(), name)
  dst = os.path.join(root, package, name)
  os.makedirs(dst, exist_ok=True)
  open(os.path.join(root, package, "__init__.py"), "a").close()
  for entry in os.listdir(src):
    s, d = os.path.join(src, entry), os.path.join(dst, entry)
    if entry == "__pycache__" or os.path.lexists(d):
      continue
    if entry.endswith(".py"):
      shutil.copy(s, d)
    elif entry == "lib" and os.path.isdir(s):
      # A real lib/ folder, so the user's CoreNLP jars can sit beside the bundled ones.
      os.makedirs(d)
      for jar in os.listdir(s):
        os.symlink(os.path.join(s, jar), os.path.join(d, jar))
    elif extra_lib and entry.endswith(".jar"):
      # The SPICE jar resolves its manifest Class-Path (lib/...) relative to its own location,
      # which the JVM may canonicalise through a symlink: use a real copy.
      shutil.copy(s, d)
    else:
      os.symlink(s, d)
  for jar in extra_lib:
    link = os.path.join(dst, "lib", os.path.basename(jar))
    if not os.path.lexists(link):
      os.symlink(jar, link)
  return f"{package}.{name}"


def _import_from(root: str, module: str):
  """Imports `module` (dotted, under root) without leaving root on sys.path."""
  sys.path.insert(0, root)
  try:
    return importlib.import_module(module)
  finally:
    sys.path.remove(root)


def _as_inputs(references, candidates):
  if isinstance(references, Mapping):
    keys = list(references)
    references = [references[k] for k in keys]
  if len(references) != len(candidates):
    raise ValueError(f"caption metrics: {len(candidates)} candidates but {len(references)} "
                     "reference lists (one list of reference captions per candidate)")
  if not candidates:
    raise ValueError("caption metrics: no candidates to score")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"caption metrics: references[{i}] must be a non-empty list of strings, "
                       f"got {refs!r}")
  return [list(r) for r in references], [str(c) for c in candidates]


_METEOR = []


def shared_meteor():
  """pycocoevalcap's Meteor, started once per process (the JVM + paraphrase table take ~8 s).

  METEOR only reads from its package folder, so it runs in place even from a read-only install.
  """
  if not _METEOR:
    check_java()
    from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
    _METEOR.append(Meteor())
    atexit.register(close_meteor)
  return _METEOR[0]


def close_meteor():
  """Stops the shared METEOR JVM (pycocoevalcap's own shutdown: close stdin, kill, wait)."""
  while _METEOR:
    _METEOR.pop().__del__()


class CaptionScorer:
  """Scores caption sets. METEOR's JVM is shared by all scorers of the process (`shared_meteor`).

  Use as a context manager (or call `close()`). `skipped` maps metrics that are not computed to
  the reason (SPICE without CoreNLP jars).
  """

  def __init__(self, spice_corenlp_jar: str = "", *, use_shadow: Optional[bool] = None):
    check_java()
    self._pkg = pycocoevalcap_dir()
    if use_shadow is None:  # pycocoevalcap writes temp files beside its jars
      use_shadow = not os.access(os.path.join(self._pkg, "tokenizer"), os.W_OK)
    self._tmp = tempfile.mkdtemp(prefix="magvlt_captions_")
    # A private package name per scorer: sys.modules must not hand a later scorer this one's
    # (deleted) temporary folder.
    self._package = "_magvlt_pycocoevalcap_" + os.path.basename(self._tmp).replace("-", "_")
    prefix = "pycocoevalcap"
    if use_shadow:
      prefix = _shadow_subpackage(self._tmp, self._package, "tokenizer")
    else:
      prefix = "pycocoevalcap.tokenizer"
    self._tokenizer_mod = _import_from(self._tmp, prefix + ".ptbtokenizer")
    from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
    self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
    self._spice = None
    self.skipped: Dict[str, str] = {}
    if spice_corenlp_jar:
      jars = resolve_corenlp_jars(spice_corenlp_jar)
      # Always a shadow copy: the user's jars go into its lib/, so get_stanford_models() finds
      # them and never downloads, and the site-packages folder is left untouched.
      spice_pkg = _shadow_subpackage(self._tmp, self._package, "spice", jars)
      spice_mod = _import_from(self._tmp, spice_pkg + ".spice")
      self._spice = spice_mod.Spice()
    else:
      self.skipped["spice"] = ("needs Stanford CoreNLP 3.6.0 jars: set "
                               f"config.eval.spice_corenlp_jar to {CORENLP_JAR} "
                               f"(with {CORENLP_MODELS_JAR} beside it)")

  def tokenize(self, references, candidates):
    """PTB-tokenises references and candidates in one JVM call (per-line, so same result)."""
    data = {}
    for i, (refs, cand) in enumerate(zip(references, candidates)):
      data[("ref", i)] = [{"caption": r} for r in refs]
      data[("cand", i)] = [{"caption": cand}]
    out = self._tokenizer_mod.PTBTokenizer().tokenize(data)
    gts = {i: out[("ref", i)] for i in range(len(candidates))}
    res = {i: out[("cand", i)] for i in range(len(candidates))}
    return gts, res

  def score(self, references, candidates: Sequence[str]) -> Dict[str, float]:
    """references: per candidate a list of reference captions (or a dict keyed like candidates
    order); candidates: one caption each. Returns {bleu_1..4, meteor, rouge_l, cider[, spice]}."""
    references, candidates = _as_inputs(references, candidates)
    gts, res = self.tokenize(references, candidates)
    bleu, _ = self._bleu.compute_score(gts, res, verbose=0)
    out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["meteor"] = float(shared_meteor().compute_score(gts, res)[0])
    out["rouge_l"] = float(self._rouge.compute_score(gts, res)[0])
    out["cider"] = float(self._cider.compute_score(gts, res)[0])
    if self._spice is not None:
      out["spice"] = float(self._spice.compute_score(gts, res)[0])
    return out

  def close(self):
    for name in [m for m in sys.modules if m.startswith(self._package)]:
      del sys.modules[name]
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def caption_metrics(references, candidates: Sequence[str], spice_corenlp_jar: str = ""):
  """One-shot convenience: (scores dict of floats, skipped dict of metric -> reason)."""
  with CaptionScorer(spice_corenlp_jar) as scorer:
    return scorer.score(references, candidates), dict(scorer.skipped)
