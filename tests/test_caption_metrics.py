"""Caption metrics: our wrapper reproduces pycocoevalcap's COCOEvalCap pipeline run directly."""
import os
import shutil
import sys

import pytest

from magvlt_jax.evaluation import caption_metrics as cm

pytest.importorskip("pycocoevalcap")
requires_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="Java not installed: PTB tokenizer and METEOR need it "
           "(apt-get install openjdk-17-jre-headless)")

REFS = [
    ["A cat sits on the mat.", "The cat is lying on a red mat", "a small cat on a mat"],
    ["A dog runs in the park!", "a brown dog running on grass"],
    ["Two birds, flying over the sea.", "birds fly above water"],
    ["a man riding a bike down the street", "A person on a bicycle."],
]
CANDS = ["a cat on a mat", "a dog running in a park", "", "a man rides a bicycle on the street"]


def _direct(refs, cands):
  """The COCOEvalCap.evaluate recipe, written out with pycocoevalcap's classes."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  gts = {i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)}
  res = {i: [{"caption": c}] for i, c in enumerate(cands)}
  gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  out = {f"bleu_{i + 1}": b for i, b in enumerate(bleu)}
  # The JVM is pycocoevalcap's Meteor class; shared so the test pays its ~8 s start once.
  out["meteor"] = cm.shared_meteor().compute_score(gts, res)[0]
  out["rouge_l"] = Rouge().compute_score(gts, res)[0]
  out["cider"] = Cider().compute_score(gts, res)[0]
  return out


@requires_java
def test_scores_match_pycocoevalcap_direct_and_shadow_copy():
  expected = _direct(REFS, CANDS)
  with cm.CaptionScorer() as scorer:
    got = scorer.score(REFS, CANDS)
    assert set(got) == set(expected)
    for k, v in expected.items():
      assert got[k] == pytest.approx(v, abs=1e-9), k
    assert all(isinstance(v, float) for v in got.values())
    assert "spice" in scorer.skipped and "spice_corenlp_jar" in scorer.skipped["spice"]
    # Second call on a subset reuses the JVM and scores only that subset.
    sub = scorer.score(REFS[:2], CANDS[:2])
    assert sub["cider"] == pytest.approx(_direct(REFS[:2], CANDS[:2])["cider"])
  # Read-only installs: tokenisation from a temporary shadow copy gives the same numbers.
  with cm.CaptionScorer(use_shadow=True) as scorer:
    shadow = scorer.score(REFS, CANDS)
  assert shadow == got
  # Sanity of the numbers themselves: an exact copy of a reference scores BLEU-1 = 1.
  scores, _ = cm.caption_metrics([["a red bus on the road"]], ["a red bus on the road"])
  assert scores["bleu_1"] == pytest.approx(1.0) and scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_missing_java_names_the_package(monkeypatch):
  monkeypatch.setattr(cm.shutil, "which", lambda name: None)
  with pytest.raises(cm.JavaNotFoundError, match="openjdk-17-jre-headless"):
    cm.CaptionScorer()


@requires_java
def test_bad_inputs_fail_with_clear_errors():
  with cm.CaptionScorer() as scorer:
    with pytest.raises(ValueError, match="2 candidates but 1 reference"):
      scorer.score([["a cat"]], ["a cat", "a dog"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
      scorer.score(["a cat"], ["a cat"])


def test_spice_jar_errors_and_wiring(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.eval.spice_corenlp_jar"):
    cm.resolve_corenlp_jars(str(tmp_path / "missing.jar"))
  # Placeholder jars: we only check the wiring (SPICE itself would need the real CoreNLP).
  for name in (cm.CORENLP_JAR, cm.CORENLP_MODELS_JAR):
    (tmp_path / name).write_bytes(b"jar")
  assert cm.resolve_corenlp_jars(str(tmp_path)) == cm.resolve_corenlp_jars(
      str(tmp_path / cm.CORENLP_JAR))
  if shutil.which("java") is None:
    pytest.skip("Java not installed")
  scorer = cm.CaptionScorer(str(tmp_path))
  try:
    spice_dir = os.path.dirname(sys.modules[type(scorer._spice).__module__].__file__)
    lib = os.path.join(spice_dir, "lib")
    # pycocoevalcap's get_stanford_models() looks exactly here: found, so no download happened.
    assert os.path.realpath(os.path.join(lib, cm.CORENLP_JAR)) == str(tmp_path / cm.CORENLP_JAR)
    assert os.path.exists(os.path.join(lib, cm.CORENLP_MODELS_JAR))
    assert os.path.exists(os.path.join(lib, "SceneGraphParser-1.0.jar"))
    assert not os.path.islink(os.path.join(spice_dir, "spice-1.0.jar"))
    assert "spice" not in scorer.skipped
  finally:
    scorer.close()
  site_lib = os.path.join(cm.pycocoevalcap_dir(), "spice", "lib", cm.CORENLP_JAR)
  assert not os.path.exists(site_lib)  # the installed package was left untouched
