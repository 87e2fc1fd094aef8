"""Peak FLOP/s per device kind, for model FLOPs utilisation (MFU).

Dense bf16 peaks from the vendors' data sheets (no sparsity). Matching is by
substring of `device.device_kind`, first hit wins, so order matters.
"""

import jax

PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU7x", 2307e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of one device, or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int,
        peak: float | None) -> float | None:
  if not peak:
    return None
  return flops_per_token * tokens_per_s / (peak * num_devices)
