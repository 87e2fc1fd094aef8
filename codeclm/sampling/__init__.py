"""Sampling: the jitted sampler (sampler.py), a workdir loaded for it
(workdir.py), requests -> files and grids (files.py), TensorBoard grids during
training (tensorboard.py), and the JPEG grammar that keeps samples decodable
(jpeg_grammar.py, token_grammar.py)."""
