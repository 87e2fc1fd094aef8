"""Converts pytorch-fid's Inception weights (.pth) into codeclm's .npz.

Run once, on any machine with torch, after downloading
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

  python -m codeclm.eval.convert_inception \
      --src=pt_inception-2015-12-05-6726825d.pth --dst=fid_inception.npz

Afterwards FID needs only the .npz (codeclm.eval.inception.load_params). This
module needs torch and numpy, not JAX: the mapping is by name only. torch's
`Mixed_5b.branch1x1.conv.weight` [O, I, H, W] becomes
`params/Mixed_5b/branch1x1/conv/kernel` [H, W, I, O]; BatchNorm weight/bias
become scale/bias under "params" and running_mean/running_var become
mean/var under "batch_stats". The 1008-way classifier (fc), any auxiliary
head and num_batches_tracked counters are dropped.
"""

from __future__ import annotations

from typing import Mapping

from absl import app
from absl import flags
import numpy as np

_DROPPED_MODULES = ("fc", "AuxLogits")
_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def convert_state_dict(
    state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
  """A torch Inception-v3 state_dict -> {'params/.../kernel': float32 array}.

  Raises:
    ValueError: a key that is neither a BasicConv2d's conv/bn entry nor one
      of the dropped ones, naming it.
  """
  out = {}
  for key, tensor in state_dict.items():
    parts = key.split(".")
    if parts[0] in _DROPPED_MODULES or parts[-1] == "num_batches_tracked":
      continue
    if hasattr(tensor, "detach"):  # A torch tensor.
      tensor = tensor.detach().cpu().numpy()
    value = np.asarray(tensor, np.float32)
    path, (layer, leaf) = parts[:-2], (["", ""] + parts)[-2:]
    if layer == "conv" and leaf == "weight" and value.ndim == 4:
      out["/".join(["params", *path, "conv", "kernel"])] = value.transpose(
          2, 3, 1, 0)
    elif layer == "bn" and leaf in _BN_LEAVES:
      collection, name = _BN_LEAVES[leaf]
      out["/".join([collection, *path, "bn", name])] = value
    else:
      raise ValueError(
          f"Unexpected key {key!r} (shape {value.shape}) in the state_dict: "
          "is it pytorch-fid's pt_inception-2015-12-05-6726825d.pth?")
  return out


_SRC = flags.DEFINE_string(
    "src", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_DST = flags.DEFINE_string("dst", None, "Output .npz, e.g. fid_inception.npz.")


def main(argv):
  del argv
  # Imported here: the mapping above needs only numpy.
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = torch.load(_SRC.value, map_location="cpu", weights_only=True)
  arrays = convert_state_dict(state_dict)
  with open(_DST.value, "wb") as f:
    np.savez(f, **arrays)
  print(f"Wrote {len(arrays)} arrays to {_DST.value}.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
