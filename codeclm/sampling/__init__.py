"""Sampling: the sampler (sampler.py) with its jitted prefill + decode loop
(decode_loop.py), the constraint hook (constraint.py) and the multi-process
helpers (hosts.py); a workdir loaded for it (workdir.py), requests -> files
and grids (files.py), TensorBoard grids during training (tensorboard.py), and
the JPEG grammar that keeps samples decodable (jpeg_grammar.py,
token_grammar.py)."""
