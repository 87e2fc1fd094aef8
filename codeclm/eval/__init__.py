"""FID evaluation: the sharded job (evaluate.py) over the work's slots, ids
and slices (work.py), the reference images (references.py), one slice's
completions and features (completions.py), the slices on disk and their
merge into results.json (results.py), and with labelled references FID per
class, guided samples' FID and class agreement (per_class.py); the Frechet
distance (fid.py), the Inception network (inception.py) and the converter of
pytorch-fid's weights (convert_inception.py)."""
