"""TFDS builders (synthetic, COCO-captions folder, JSONL/CSV list) and prepare-time bad-data handling."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from magvlt_jax.configs_util import load_config
from magvlt_jax.data import builders
from magvlt_jax.data import synthetic
from magvlt_jax.data import transforms


def _png(arr, mode=None):
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(img: Image.Image):
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def bad_images() -> dict[str, bytes | None]:
  """file name -> bytes (None: referenced but not written, i.e. missing)."""
  gray16 = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
  palette = Image.fromarray(_rgb(40, 40, 3)).convert("P", palette=Image.Palette.ADAPTIVE)
  full = _jpeg(Image.fromarray(_rgb(64, 80, 4)))
  return {
      "ok_rgb.jpg": _jpeg(Image.fromarray(_rgb(48, 64, 1))),
      "gray.png": _png(_rgb(40, 40, 2)[..., 0]),
      "rgba.png": _png(np.concatenate([_rgb(40, 40, 5), np.full((40, 40, 1), 128, np.uint8)], -1)),
      "cmyk.jpg": _jpeg(Image.fromarray(_rgb(40, 40, 6)).convert("CMYK")),
      "gray16.png": _png(gray16),  # PIL mode I;16
      "palette.png": (lambda b: (palette.save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
      "tiny.png": _png(_rgb(4, 6, 7)),
      "huge.png": _png(_rgb(120, 120, 8)),  # > max_image_pixels set below
      "wide.png": _png(_rgb(20, 150, 9)),  # long side > max_image_side: downscaled
      "corrupt.jpg": b"this is not an image at all",
      "truncated.jpg": full[: len(full) // 2],
      "missing.jpg": None,
  }


def _config(name, path):
  config = load_config("configs/magvlt.py:tiny")
  config.data.name = name
  config.data.path = str(path)
  config.data.max_image_pixels = 10_000
  config.data.max_image_side = 100
  return config


def _write_images(folder, images):
  folder.mkdir(parents=True, exist_ok=True)
  for fname, data in images.items():
    if data is not None:
      (folder / fname).write_bytes(data)


def _read_split(config, data_dir, split):
  builder = builders.get_builder(config, str(data_dir))
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def test_synthetic_builder(tmp_path):
  config = load_config("configs/magvlt.py:tiny")
  config.data.synthetic.num_train, config.data.synthetic.num_eval = 24, 6
  info = builders.prepare(config, str(tmp_path))
  assert info["splits"] == {"train": 24, "validation": 6} and info["counts"] == {"kept": 30}
  recs = _read_split(config, tmp_path, "train")
  by_id = {int(r["image_id"]): r for r in recs}
  assert sorted(by_id) == list(range(24))
  for i, image, caps, scene in synthetic.examples(24, seed=0, size=64):
    r = by_id[i]
    assert [c.decode() for c in r["captions"]] == caps and len(caps) == 3
    np.testing.assert_array_equal(np.asarray(transforms.decode_image(r["image"])), image)
    assert synthetic.parse_caption(caps[0]) == list(scene.objects)
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  stored = [c.decode() for i in range(24) for c in by_id[i]["captions"]]
  assert list(pipeline.synthetic_captions(config)) == stored  # spm training sees these
  # prepared once: a second call reuses the data and its stored counts
  assert builders.prepare(config, str(tmp_path))["counts"] == {"kept": 30}
  # a different synthetic config is a different dataset, never stale data
  config.data.synthetic.num_train = 12
  assert builders.prepare(config, str(tmp_path))["splits"]["train"] == 12


def test_synthetic_scene_space_is_small_and_captions_unambiguous():
  assert len(synthetic.all_single_object_prompts()) == 6 * 4 * 9
  s = synthetic.scene(3)
  img = synthetic.render(s, 64)
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  row, col = synthetic.PLACES[s.objects[0].place]
  cell = img[row * 21:(row + 1) * 21, col * 21:(col + 1) * 21].reshape(-1, 3)
  assert (cell == synthetic.COLORS[s.objects[0].color]).all(-1).sum() > 40  # drawn in its cell
  two = synthetic.scene(5, max_objects=2)
  for seed in range(20):
    two = synthetic.scene(seed, max_objects=2)
    if len(two.objects) == 2:
      break
  assert set(synthetic.parse_caption(synthetic.captions(two, 0, 1)[0])) == set(two.objects)



def test_read_scene_scores_rendered_and_wrong_images():
  # Every rendered scene reads back as itself; a blank image and a wrong colour/place do not.
  for _, img, _, s in synthetic.examples(60, seed=4, size=64):
    assert synthetic.read_scene(img) == s.objects[0]
    assert synthetic.match_score(list(s.objects), synthetic.read_scene(img))["all"] == 1
  blank = np.zeros((64, 64, 3), np.uint8) + np.asarray(synthetic.BACKGROUND, np.uint8)
  assert synthetic.read_scene(blank) is None
  expected = [synthetic.Obj("red", "circle", "top left")]
  assert synthetic.match_score(expected, None) == {"color": 0, "shape": 0, "place": 0, "all": 0}
  other = synthetic.render(synthetic.scene_from_caption_parts("blue", "circle", "bottom right"), 64)
  assert synthetic.match_score(expected, synthetic.read_scene(other)) == {
      "color": 0, "shape": 1, "place": 0, "all": 0}
  assert synthetic.match_rates([expected, expected], [expected[0], synthetic.read_scene(other)]) == {
      "color": 0.5, "shape": 1.0, "place": 0.5, "all": 0.5}

def _coco_json(images, captions):
  return {
      "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
      "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                    "name": "Attribution-NonCommercial-ShareAlike License"}],
      "images": [{"license": 1, "file_name": f, "coco_url": "", "height": 0, "width": 0,
                  "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": i}
                 for i, f in images],
      "annotations": [{"image_id": i, "id": 1000 + k, "caption": c}
                      for k, (i, c) in enumerate(captions)],
  }


def test_coco_captions_folder_with_bad_data(tmp_path):
  root = tmp_path / "coco"
  imgs = bad_images()
  _write_images(root / "train2014", imgs)
  names = list(imgs) + ["empty_caps.jpg", "long_caption.jpg"]
  (root / "train2014" / "empty_caps.jpg").write_bytes(imgs["ok_rgb.jpg"])
  (root / "train2014" / "long_caption.jpg").write_bytes(imgs["ok_rgb.jpg"])
  images = [(100 + k, n) for k, n in enumerate(names)]
  caps = []
  for i, n in images:
    if n == "empty_caps.jpg":
      caps += [(i, ""), (i, "  ...  ")]
    elif n == "long_caption.jpg":
      caps += [(i, "word " * 400)]
    else:
      caps += [(i, f"A photo of {n}."), (i, f"another caption of {n}"), (i, "")]
  caps.append((999, "caption of an image id that does not exist"))
  (root / "annotations").mkdir()
  (root / "annotations" / "captions_train2014.json").write_text(
      json.dumps(_coco_json(images, caps)))
  _write_images(root / "val2014", {"v.jpg": imgs["ok_rgb.jpg"]})
  (root / "annotations" / "captions_val2014.json").write_text(
      json.dumps(_coco_json([(7, "v.jpg")], [(7, "a val caption"), (7, "second")])))

  config = _config("coco_captions_folder", root)
  info = builders.prepare(config, str(tmp_path / "data"))
  c = info["counts"]
  assert info["splits"] == {"train": 9, "validation": 1}
  assert c["corrupt"] == 2 and c["missing_file"] == 1 and c["too_large"] == 1
  assert c["no_caption"] == 1 and c["unknown_image_id"] == 1 and c["caption_cut"] == 1
  assert c["converted"] == 5 and c["downscaled"] == 1 and c["tiny_upscaled"] == 1
  assert c["empty_caption"] == (len(names) - 2) + 2 and c["kept"] == 10
  recs = {int(r["image_id"]): r for r in _read_split(config, tmp_path / "data", "train")}
  for image_id, name in images:
    if image_id not in recs:
      continue
    img = transforms.decode_image(recs[image_id]["image"])
    assert img.mode == "RGB"  # every stored image decodes to 8-bit RGB
    if name not in ("long_caption.jpg",):
      assert len(recs[image_id]["captions"]) == 2  # both non-empty captions, one record
  gray16 = next(i for i, n in images if n == "gray16.png")
  arr = np.asarray(transforms.decode_image(recs[gray16]["image"]))
  assert 0 < arr.mean() < 255 and arr.max() > 200  # rescaled from 16 bits, not clipped to white
  wide = next(i for i, n in images if n == "wide.png")
  assert transforms.decode_image(recs[wide]["image"]).size == (100, 13)
  long_id = next(i for i, n in images if n == "long_caption.jpg")
  assert len(recs[long_id]["captions"][0]) <= 1000


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_image_text_list(tmp_path, fmt):
  imgs = {f"img{k}.png": _png(_rgb(30, 40, k)) for k in range(5)}
  _write_images(tmp_path / "pics", imgs)
  rows = [{"image": f"pics/img{k}.png", "caption": f"picture number {k}"} for k in range(5)]
  rows.append({"image": "pics/img0.png", "caption": "second caption of zero"})
  rows.append({"image": "pics/nope.png", "caption": "missing file"})
  rows.append({"image": "pics/img1.png", "caption": ""})
  path = tmp_path / f"list.{fmt}"
  if fmt == "jsonl":
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  else:
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, ["image", "caption"])
      w.writeheader()
      w.writerows(rows)
  config = _config("image_text_list", path)
  info = builders.prepare(config, str(tmp_path / "data"))
  assert info["splits"]["train"] + info["splits"]["validation"] == 5
  assert info["splits"]["validation"] >= 1  # one file: an image held out for eval
  assert info["counts"]["missing_file"] == 1 and info["counts"]["empty_caption"] == 1
  assert info["counts"].get("bad_row", 0) == (1 if fmt == "jsonl" else 0)
  recs = _read_split(config, tmp_path / "data", "train") + _read_split(
      config, tmp_path / "data", "validation")
  caps = {c.decode() for r in recs for c in r["captions"]}
  assert {"picture number 0", "second caption of zero"} <= caps
  zero = next(r for r in recs if b"picture number 0" in r["captions"])
  assert len(zero["captions"]) == 2  # rows sharing an image are merged


def test_image_text_list_explicit_splits(tmp_path):
  _write_images(tmp_path, {f"{k}.png": _png(_rgb(20, 20, k)) for k in range(3)})
  (tmp_path / "a.jsonl").write_text("\n".join(
      json.dumps({"file_name": f"{k}.png", "text": f"train {k}"}) for k in range(2)))
  (tmp_path / "b.jsonl").write_text(json.dumps({"path": "2.png", "captions": ["v one", "v two"]}))
  spec = f"train={tmp_path / 'a.jsonl'},validation={tmp_path / 'b.jsonl'}"
  info = builders.prepare(_config("image_text_list", spec), str(tmp_path / "data"))
  assert info["splits"] == {"train": 2, "validation": 1}
  (rec,) = _read_split(_config("image_text_list", spec), tmp_path / "data", "validation")
  assert [c.decode() for c in rec["captions"]] == ["v one", "v two"]


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
  config = load_config("configs/magvlt.py:tiny")
  config.data.name = "cifar"
  with pytest.raises(ValueError, match="config.data.name"):
    builders.get_builder(config, str(tmp_path))
  config.data.name = "coco_captions_folder"
  config.data.path = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="annotations"):
    builders.prepare(config, str(tmp_path / "d"))


def test_prepare_data_tool_then_train_on_the_folder(tmp_path, capsys):
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from magvlt_jax.tools import prepare_data  # pylint: disable=import-outside-toplevel
  root = tmp_path / "coco"
  imgs = {f"COCO_train2014_{i:012d}.jpg": _jpeg(Image.fromarray(_rgb(48 + 8 * i, 80, i)))
          for i in range(6)}
  imgs["COCO_train2014_000000000099.jpg"] = b"corrupt"
  _write_images(root / "train2014", imgs)
  images = [(i, n) for i, n in enumerate(imgs)]
  (root / "annotations").mkdir()
  (root / "annotations" / "captions_train2014.json").write_text(json.dumps(_coco_json(
      images, [(i, f"A photo number {i}.") for i, _ in images] + [(0, "Another one")])))
  config = _config("coco_captions_folder", root)
  config.data.global_batch_size = 4
  workdir = tmp_path / "work"
  info = prepare_data.prepare(config, workdir=str(workdir), text_tokenizer=True)
  out = capsys.readouterr().out
  assert "split train: 6 records" in out and "corrupt=1" in out and "corrupt: " in out
  assert (workdir / "text" / "spm.model").exists() and info["path"].startswith(str(workdir))
  from magvlt_jax import text  # pylint: disable=import-outside-toplevel
  tok = text.get_or_train_tokenizer(config, str(workdir))
  it = pipeline.create_train_iterator(config, tok, workdir=str(workdir))
  batch = next(it)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["text"].shape == (4, 24)
  assert it.stats["prepare"]["corrupt"] == 1
  assert all(c.startswith("a photo number") or c == "another one" for c in tok.decode(batch["text"]))
