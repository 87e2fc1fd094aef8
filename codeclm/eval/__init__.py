"""FID evaluation: the sharded job with its slices and merge (evaluate.py),
the Frechet distance (fid.py), the Inception network (inception.py) and the
converter of pytorch-fid's weights (convert_inception.py)."""
