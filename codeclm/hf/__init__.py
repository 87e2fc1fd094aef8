"""Hugging Face interop: the weight mapping (weights.py), import of released
checkpoints (import_hf.py) and export of a workdir (export_hf.py)."""
