"""Two-object scenes: distinct colours, both caption orders, and scores that see binding."""
import numpy as np

from magvlt_jax.data import synthetic
from magvlt_jax.train import samples

Obj = synthetic.Obj
RED_CIRCLE_TL = Obj("red", "circle", "top left")
BLUE_SQUARE_BR = Obj("blue", "square", "bottom right")
TRUE = "a red circle in the top left and a blue square in the bottom right"
TRUE_SWAPPED_ORDER = "a blue square in the bottom right and a red circle in the top left"
SWAPPED_COLOURS = "a blue circle in the top left and a red square in the bottom right"


def _hand_drawn():
  return synthetic.render(synthetic.Scene((RED_CIRCLE_TL, BLUE_SQUARE_BR), ((0.0, 0.0), (0.0, 0.0))))


def test_two_object_scenes_have_distinct_colours_and_both_caption_orders():
  firsts = set()
  for i in range(200):
    rng = np.random.default_rng([3, i])
    s = synthetic.scene(rng, max_objects=2)
    if len(s.objects) == 2:
      assert s.objects[0].color != s.objects[1].color and s.objects[0].place != s.objects[1].place
      for c in synthetic.captions(s, rng, 3):
        parsed = synthetic.parse_caption(c)
        assert set(parsed) == set(s.objects)
        firsts.add(parsed[0] == s.objects[0])
  assert firsts == {True, False}


def test_read_objects_reads_back_every_rendered_object():
  seen = {1: 0, 2: 0}
  for _, img, _, s in synthetic.examples(120, seed=4, size=64, max_objects=2):
    assert synthetic.read_objects(img) == sorted(s.objects, key=lambda o: synthetic.PLACES[o.place])
    seen[len(s.objects)] += 1
  assert min(seen.values()) > 20
  blank = np.zeros((64, 64, 3), np.uint8) + np.asarray(synthetic.BACKGROUND, np.uint8)
  assert synthetic.read_objects(blank) == []


def test_swapped_colours_score_zero_and_the_true_caption_one():
  img = _hand_drawn()
  truth = synthetic.parse_caption(TRUE)
  assert synthetic.read_objects(img) == [RED_CIRCLE_TL, BLUE_SQUARE_BR]
  # T2I: the image against the true prompt (either order) and against the swapped-colour prompt.
  for prompt in (TRUE, TRUE_SWAPPED_ORDER):
    s = samples.synthetic_scores([prompt], [prompt], img[None], img[None])
    assert s["t2i_obj_color_place"] == s["t2i_obj_all"] == s["t2i_triple_f1"] == 1.0
    assert s["t2i_obj_color_place_2obj"] == 1.0
  s = samples.synthetic_scores([SWAPPED_COLOURS], [SWAPPED_COLOURS], img[None], img[None])
  assert s["t2i_obj_color_place"] == s["t2i_triple_f1"] == s["t2i_triple_f1_2obj"] == 0.0
  # I2T: the caption of the true scene vs one with the right colours on swapped objects.
  for caption, want in ((TRUE, 1.0), (TRUE_SWAPPED_ORDER, 1.0), (SWAPPED_COLOURS, 0.0)):
    s = samples.synthetic_scores([TRUE], [caption], img[None], img[None])
    assert s["i2t_triple_precision"] == s["i2t_triple_recall"] == s["i2t_triple_f1"] == want
    assert s["i2t_obj_color_place"] == want
  # Half right: one of two triples named, plus one wrong triple.
  half = synthetic.binding_scores([truth], [[RED_CIRCLE_TL, Obj("green", "cross", "center")]])
  assert half["triple_precision"] == half["triple_recall"] == half["triple_f1"] == 0.5
  assert half["obj_color_place"] == 0.5


def test_single_object_scores_are_unchanged_and_binding_agrees():
  data = list(synthetic.examples(6, seed=8, size=64))
  prompts = [caps[0] for _, _, caps, _ in data]
  images = np.stack([img for _, img, _, _ in data])
  wrong = images[::-1]  # every image paired with another scene's prompt
  s = samples.synthetic_scores(prompts, prompts, wrong, images)
  expected = [synthetic.parse_caption(p) for p in prompts]
  old = synthetic.match_rates(expected, [synthetic.read_scene(img) for img in wrong])
  assert {k: s[f"t2i_{k}"] for k in old} == old
  assert s["tokenizer_all"] == s["i2t_all"] == 1.0
  assert s["t2i_obj_all"] == old["all"]  # one object per scene: per-object == whole-scene score
  assert "t2i_triple_f1_2obj" not in s  # no two-object scene in the batch


def test_prompts_that_name_no_object_get_no_binding_keys():
  img = _hand_drawn()
  s = samples.synthetic_scores(["a red circle in the"], ["a red circle"], img[None], img[None])
  assert s["t2i_all"] == 0.0 and not any("triple" in k or "_obj_" in k for k in s)
