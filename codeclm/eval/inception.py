"""The FID Inception-v3 in Flax: pool features, weights, image preprocessing.

Standard FID (Heusel et al. 2017) is defined by one network: the 2015
TensorFlow Inception graph, which pytorch-fid (mseitzer/pytorch-fid) ports to
PyTorch. This module rebuilds that port in Flax so that codeclm's FID numbers
can be compared with published ones:

  * torchvision's Inception-v3 stem, BatchNorm eps 1e-3, no conv biases;
  * the FID blocks: the 3x3 average pools in Mixed_5b..6e and Mixed_7b ignore
    the zero padding (count_include_pad=False), and Mixed_7c's pool branch
    takes a max instead of an average;
  * the output is the 2048-d global average pool (pytorch-fid's block 3); the
    1008-way classifier is never needed and not kept.

Inputs go through `preprocess`, which reproduces pytorch-fid's
`resize_input=True, normalize_input=True`: pixels in [0, 1] resized to
299x299 with bilinear interpolation (half-pixel centres, no antialiasing, as
torch's F.interpolate(align_corners=False)) and mapped to [-1, 1].

Weights: download WEIGHTS_URL on a machine with internet access and convert it
once with torch (CONVERT_COMMAND); afterwards only the .npz is needed. The
parameter tree is Flax's variables dict, {"params": ..., "batch_stats": ...},
with module names copied from torch's state_dict so that the converter maps
keys one to one, e.g. `Mixed_5b.branch1x1.bn.running_var` ->
`batch_stats/Mixed_5b/branch1x1/bn/var`.

Convolutions run at Precision.HIGHEST by default: on TPU and GPU the default
precision (bf16 passes / TF32) can move the features, and with them FID.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/pt_inception-2015-12-05-6726825d.pth")
CONVERT_COMMAND = ("python -m codeclm.eval.convert_inception "
                   "--src=pt_inception-2015-12-05-6726825d.pth "
                   "--dst=fid_inception.npz")
INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPSILON = 1e-3
_SEP = "/"  # Joins the parameter path into one .npz key.

Params = Any  # {"params": ..., "batch_stats": ...}, Flax's variables dict.


class InceptionWeightsError(ValueError):
  """A weights file that does not hold the FID Inception's parameters."""


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> inference BatchNorm (eps 1e-3) -> ReLU."""
  features: int
  kernel_size: int | Sequence[int]
  strides: int = 1
  padding: int | Sequence[int] = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size),
                strides=_pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """TensorFlow's 3x3/1 average pool: padded zeros are not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b..5d (FIDInceptionA)."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, 1, name="branch1x1")(x)
    branch5x5 = conv(48, 1, name="branch5x5_1")(x)
    branch5x5 = conv(64, 5, padding=2, name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name="branch_pool")(
        _avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool],
                           axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: the 35x35 -> 17x17 reduction."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, 3, strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)],
                           axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name="branch1x1")(x)
    branch7x7 = conv(c7, 1, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    dbl = conv(c7, 1, name="branch7x7dbl_1")(x)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
    dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
    dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
    branch_pool = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: the 17x17 -> 8x8 reduction."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, 1, name="branch3x3_1")(x)
    branch3x3 = conv(320, 3, strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3),
                       name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0),
                       name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)],
                           axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and 7c (E_2, max pool)."""
  pool: str  # "avg" or "max"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, 1, name="branch1x1")(x)
    branch3x3 = conv(384, 1, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)
    dbl = conv(448, 1, name="branch3x3dbl_1")(x)
    dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(dbl)
    dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      # The FID graph's quirk (pytorch-fid's FIDInceptionE_2): a max pool.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool={self.pool!r}: use 'avg' or 'max'.")
    branch_pool = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to its 2048-d average pool.

  Call on float NHWC images already resized and normalised by `preprocess`;
  returns [N, 2048] float32 features.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = self.precision
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride_2(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride_2(x)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images) -> jnp.ndarray:
  """Images -> the network's input, as pytorch-fid prepares them.

  Args:
    images: [N, H, W, 3], uint8 (0..255) or float in [0, 1].

  Returns:
    float32 [N, 299, 299, 3] in [-1, 1]: bilinear resize with half-pixel
    centres and no antialiasing (torch F.interpolate, align_corners=False),
    then 2x - 1.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"preprocess: images of shape {images.shape}; expected "
                     "[N, H, W, 3] RGB (convert greyscale or RGBA to RGB).")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  n = x.shape[0]
  x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), method="bilinear",
                       antialias=False)
  return 2.0 * x - 1.0


def param_shapes() -> dict[str, tuple[int, ...]]:
  """The .npz key -> shape of every array the network needs."""
  return dict(_param_shapes())


@functools.cache
def _param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  variables = jax.eval_shape(
      InceptionV3().init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  flat = traverse_util.flatten_dict(variables, sep=_SEP)
  return tuple((key, tuple(value.shape)) for key, value in flat.items())


def _flatten(params: Params) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep=_SEP)
  return {key: np.asarray(value, np.float32) for key, value in flat.items()}


def random_params(seed: int = 0) -> Params:
  """Random weights with non-trivial BatchNorm statistics, for tests and demos.

  Kernels are He-normal and the BatchNorm scale, shift, mean and variance are
  all random (mean 0 / variance 1 would hide a mapping error), scaled so that
  activations stay of order one through the 94 layers.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in sorted(param_shapes().items()):
    leaf = key.rsplit(_SEP, 1)[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    flat[key] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep=_SEP)


def save_params(params: Params, path: str | os.PathLike) -> None:
  """Writes params as an .npz of float32 arrays keyed 'params/Mixed_5b/...'."""
  with open(path, "wb") as f:
    np.savez(f, **_flatten(params))


def load_params(path: str | os.PathLike) -> Params:
  """Reads the .npz written by the converter (or `save_params`).

  Raises:
    FileNotFoundError: no file at `path`; the message says how to make one.
    InceptionWeightsError: a key is missing, unexpected or the wrong shape.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path!r}. Download {WEIGHTS_URL} "
        f"and convert it once with torch: {CONVERT_COMMAND} (then pass the "
        ".npz path).")
  try:
    with np.load(path) as npz:
      flat = {key: npz[key] for key in npz.files}
  except (OSError, ValueError) as e:
    raise InceptionWeightsError(
        f"{path!r} is not a readable .npz ({e}); convert {WEIGHTS_URL} with: "
        f"{CONVERT_COMMAND}") from e
  expected = param_shapes()
  for key, shape in expected.items():
    if key not in flat:
      raise InceptionWeightsError(
          f"{path!r} lacks {key!r} (shape {shape}); is it the FID Inception "
          f"converted by {CONVERT_COMMAND}?")
    if flat[key].shape != shape:
      raise InceptionWeightsError(
          f"{path!r}: {key!r} has shape {flat[key].shape}, expected {shape}.")
  unexpected = sorted(set(flat) - set(expected))
  if unexpected:
    raise InceptionWeightsError(
        f"{path!r} holds {len(unexpected)} unexpected arrays, first "
        f"{unexpected[0]!r}; is it the FID Inception converted by "
        f"{CONVERT_COMMAND}?")
  return traverse_util.unflatten_dict(
      {key: value.astype(np.float32) for key, value in flat.items()}, sep=_SEP)


def params_hash(params: Params) -> str:
  """sha256 hex over the sorted keys, shapes and float32 bytes of params.

  Depends only on the values, not on how or when the .npz was written.
  """
  digest = hashlib.sha256()
  for key, value in sorted(_flatten(params).items()):
    digest.update(f"{key}:{value.shape}:".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


@functools.partial(jax.jit, static_argnames=("precision",))
def _features(params: Params, images: jnp.ndarray, precision) -> jnp.ndarray:
  return InceptionV3(precision=precision).apply(params, preprocess(images))


class FeatureExtractor:
  """Images -> FID pool features, jitted, in fixed-size batches.

  Every batch is padded to `batch_size`, so one image size compiles once
  whatever the number of images. Runs on JAX's default device.

  Attributes:
    weights_hash: `params_hash` of the weights, for reproducibility records.
  """

  def __init__(self, params: Params, batch_size: int = 50,
               precision: Any = jax.lax.Precision.HIGHEST):
    if batch_size < 1:
      raise ValueError(f"FeatureExtractor batch_size={batch_size}: use >= 1.")
    self.batch_size = batch_size
    self.precision = precision
    self.weights_hash = params_hash(params)
    self._params = jax.device_put(params)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> FeatureExtractor:
    """A FeatureExtractor with the weights in `path` (see `load_params`)."""
    return cls(load_params(path), **kwargs)

  def __call__(self, images) -> np.ndarray:
    """[N, H, W, 3] uint8 (or float in [0, 1]) -> [N, 2048] float32."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FeatureExtractor: images of shape {images.shape}; "
                       "expected [N, H, W, 3] RGB.")
    n = images.shape[0]
    outputs = []
    for start in range(0, n, self.batch_size):
      batch = images[start:start + self.batch_size]
      pad = self.batch_size - batch.shape[0]
      if pad:
        batch = np.concatenate(
            [batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
      features = _features(self._params, batch, self.precision)
      outputs.append(features[:self.batch_size - pad])
    if not outputs:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate([np.asarray(o, np.float32) for o in outputs])
