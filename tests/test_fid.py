"""FID against closed forms and the reference implementation, pytorch-fid.

The network test builds pytorch-fid's own FID InceptionV3 from random
weights (placed where torch.hub looks for the real ones, so nothing is
downloaded and pytorch-fid's code runs unchanged), converts those weights with
our command-line converter and compares per-image features computed from the
same PNG files.
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from codeclm.eval import convert_inception
from codeclm.eval import fid
from codeclm.eval import inception

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


@functools.cache
def _pytorch_fid():
  """Imports pytorch-fid (the `[reference]` extra) or skips.

  tests/conftest.py has made the index's CUDA-only torchvision importable.
  """
  pytorch_fid = pytest.importorskip("pytorch_fid")
  import pytorch_fid.fid_score  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception  # pylint: disable=g-import-not-at-top
  return pytorch_fid


# --- Fréchet distance -------------------------------------------------------


def _closed_form(mu1, eig1, mu2, eig2):
  """FID of Gaussians whose covariances share an eigenbasis."""
  return float(np.sum((mu1 - mu2) ** 2)
               + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2))


def test_frechet_distance_diagonal_covariances_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, _closed_form(mu1, a, mu2, b), rtol=1e-10)


def test_frechet_distance_commuting_full_covariances_closed_form():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(32, 32)))  # A shared eigenbasis.
  a, b = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
  sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2),
                             _closed_form(mu1, a, mu2, b), rtol=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
  features = np.random.default_rng(2).normal(size=(200, 48))
  mu, sigma = fid.statistics(features)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(
      sigma)
  assert abs(fid.fid(features, features)) < 1e-8 * np.trace(sigma)


def test_statistics_match_numpy_torch_and_pytorch_fid():
  features = np.random.default_rng(3).normal(size=(30, 20)).astype(np.float32)
  mu, sigma = fid.statistics(features)
  assert mu.dtype == sigma.dtype == np.float64
  assert mu.shape == (20,) and sigma.shape == (20, 20)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0))
  # np.cov is what pytorch-fid's calculate_activation_statistics calls;
  # torch.cov is an independent implementation of the same estimator.
  torch = pytest.importorskip("torch")
  ref = torch.cov(torch.from_numpy(features.astype(np.float64)).T).numpy()
  np.testing.assert_allclose(sigma, ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(sigma, np.cov(features, rowvar=False))
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(features[:1])


def test_rank_deficient_covariances_match_pytorch_fid():
  calculate = _pytorch_fid().fid_score.calculate_frechet_distance
  rng = np.random.default_rng(4)
  stats_a = fid.statistics(rng.normal(size=(10, 64)))  # Rank 9 of 64.
  stats_b = fid.statistics(rng.normal(0.3, 1.5, size=(10, 64)))
  got = fid.frechet_distance(*stats_a, *stats_b)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, calculate(*stats_a, *stats_b), rtol=1e-9)


def test_imaginary_square_root_raises_like_pytorch_fid():
  calculate = _pytorch_fid().fid_score.calculate_frechet_distance
  mu = np.zeros(2)
  not_psd = np.diag([-1.0, 1.0])  # sqrt(diag(-1, 1)) = diag(i, 1).
  with pytest.raises(ValueError, match="Imaginary component"):
    calculate(mu, not_psd, mu, np.eye(2))
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(mu, not_psd, mu, np.eye(2))


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same feature layer"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Preprocessing ----------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (512, 512), (37, 300)])
def test_preprocess_matches_torch_interpolate(size):
  torch = pytest.importorskip("torch")
  images = np.random.default_rng(5).integers(
      0, 256, (2, *size, 3), dtype=np.uint8)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
      size=(299, 299), mode="bilinear", align_corners=False)
  ref = 2 * ref.permute(0, 2, 3, 1).numpy() - 1
  got = np.asarray(inception.preprocess(images))
  assert got.shape == (2, 299, 299, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-6)
  floats = np.asarray(inception.preprocess(images.astype(np.float32) / 255))
  np.testing.assert_allclose(floats, got, atol=1e-6)


# --- The network against pytorch-fid -----------------------------------------


def _randomize(net, torch):
  """He-normal convs and random BatchNorm affine and running statistics."""
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)


def _write_pngs(directory, shape, count, seed):
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    # Smooth ramps plus noise: both interpolation and detail matter.
    ramp = np.linspace(0, 255, shape[1])[None, :, None] * rng.uniform(
        0.2, 1.0, 3)
    pixels = np.clip(ramp + rng.normal(0, 40, (*shape, 3)), 0, 255)
    path = os.path.join(directory, f"{shape[0]}_{i}.png")
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's FID InceptionV3 on random weights, and those weights."""
  pytorch_fid = _pytorch_fid()
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("fid")
  torch.manual_seed(0)
  # The torchvision model pytorch-fid starts from; its blocks hold the same
  # parameters as the FID blocks it swaps in, so the key set is the same.
  net = torchvision.models.inception_v3(
      weights=None, aux_logits=False, num_classes=1008, init_weights=False)
  _randomize(net, torch)
  state_dict = net.state_dict()
  hub = tmp / "hub"
  (hub / "checkpoints").mkdir(parents=True)
  pth = hub / "checkpoints" / _WEIGHTS_FILE
  torch.save(state_dict, pth)
  old_hub = torch.hub.get_dir()
  torch.hub.set_dir(str(hub))  # pytorch-fid loads the file found here.
  try:
    model = pytorch_fid.inception.InceptionV3([3]).eval()
  finally:
    torch.hub.set_dir(old_hub)
  np.testing.assert_array_equal(  # It did load our random weights.
      model.blocks[3][1].branch_pool.bn.running_var.numpy(),
      state_dict["Mixed_7b.branch_pool.bn.running_var"].numpy())
  npz = tmp / "fid_inception.npz"
  subprocess.run([sys.executable, "-m", "codeclm.eval.convert_inception",
                  f"--src={pth}", f"--dst={npz}"], check=True, cwd=_REPO,
                 capture_output=True)
  return dict(model=model, state_dict=state_dict, npz=npz, tmp=tmp,
              get_activations=pytorch_fid.fid_score.get_activations)


def test_converter_maps_every_array_onto_the_flax_tree(reference):
  arrays = convert_inception.convert_state_dict(reference["state_dict"])
  assert {k: v.shape for k, v in arrays.items()} == inception.param_shapes()
  torch_kernel = reference["state_dict"]["Mixed_6b.branch7x7_2.conv.weight"]
  assert tuple(torch_kernel.shape) == (128, 128, 1, 7)  # [O, I, H, W]
  np.testing.assert_array_equal(
      arrays["params/Mixed_6b/branch7x7_2/conv/kernel"],
      torch_kernel.numpy().transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="Mixed_5b.extra.weight"):
    convert_inception.convert_state_dict(
        {"Mixed_5b.extra.weight": torch_kernel})


@pytest.mark.parametrize("shape,count", [((64, 64), 3), ((512, 512), 2)])
def test_features_match_pytorch_fid(reference, shape, count):
  paths = _write_pngs(reference["tmp"], shape, count, seed=shape[0])
  expected = reference["get_activations"](
      paths, reference["model"], batch_size=count, dims=2048, device="cpu",
      num_workers=0)
  images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
  extractor = inception.FeatureExtractor.from_file(reference["npz"],
                                                   batch_size=4)
  got = extractor(images)
  assert got.shape == (count, 2048) and got.dtype == np.float32
  assert np.std(expected) > 0.1  # Not a degenerate comparison.
  assert np.abs(expected[0] - expected[1]).max() > 0.1
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
  rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert rel < 1e-5


# --- Weights files and the extractor ----------------------------------------


@pytest.fixture(scope="module")
def params():
  return inception.random_params(seed=0)


def test_load_params_missing_file_says_how_to_get_weights(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    inception.load_params(tmp_path / "nope.npz")
  message = str(info.value)
  assert inception.WEIGHTS_URL in message
  assert ("python -m codeclm.eval.convert_inception "
          "--src=pt_inception-2015-12-05-6726825d.pth "
          "--dst=fid_inception.npz") in message


def test_load_params_names_the_first_bad_array(tmp_path, params):
  path = tmp_path / "w.npz"
  inception.save_params(params, path)
  loaded = inception.load_params(path)
  assert inception.params_hash(loaded) == inception.params_hash(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)

  flat = dict(np.load(path))
  key = "params/Mixed_6e/branch7x7dbl_3/conv/kernel"
  for name, edit in [
      ("missing", lambda f: f.pop(key)),
      ("shape", lambda f: f.__setitem__(key, f[key][..., :-1])),
      ("extra", lambda f: f.__setitem__("params/fc/kernel", np.zeros(3))),
  ]:
    broken = dict(flat)
    edit(broken)
    np.savez(tmp_path / f"{name}.npz", **broken)
    expected_name = "params/fc/kernel" if name == "extra" else key
    with pytest.raises(inception.InceptionWeightsError, match=expected_name):
      inception.load_params(tmp_path / f"{name}.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(inception.InceptionWeightsError, match="junk.npz"):
    inception.load_params(tmp_path / "junk.npz")


def test_feature_extractor_is_independent_of_batch_size(params):
  images = np.random.default_rng(6).integers(0, 256, (3, 64, 64, 3),
                                             dtype=np.uint8)
  padded = inception.FeatureExtractor(params, batch_size=4)(images)
  chunked = inception.FeatureExtractor(params, batch_size=2)(images)
  np.testing.assert_allclose(chunked, padded, rtol=1e-5, atol=1e-5)
  assert np.abs(padded[0] - padded[1]).max() > 1e-2  # Images differ.
  extractor = inception.FeatureExtractor(params, batch_size=2)
  assert extractor(images[:0]).shape == (0, 2048)
  assert extractor.weights_hash == inception.params_hash(params)
  assert extractor.weights_hash != inception.params_hash(
      inception.random_params(seed=1))
  with pytest.raises(ValueError, match="RGB"):
    extractor(images[..., :1])


def test_low_rank_fid_equals_the_sqrtm_fid():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(40, 32))
  b = rng.normal(0.3, 1.5, size=(50, 32))
  # Full rank (N > D): both are exact.
  assert fid.fid(a, b, "low_rank") == pytest.approx(fid.fid(a, b), rel=1e-9)
  # Fewer samples than dimensions: sqrtm (with its eps) agrees loosely.
  a, b = a[:20].repeat(2, axis=1), b[:25].repeat(2, axis=1)
  assert fid.fid(a, b, "low_rank") == pytest.approx(fid.fid(a, b), rel=1e-3)
  with pytest.raises(ValueError, match="low_rank"):
    fid.fid(a, b, "exact")
