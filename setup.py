"""ctrl_jax: adding conditional control to pre-trained diffusion models with RL (CTRL), in JAX."""
import setuptools

# Pinned: diffusers 0.39.0 is the last release with Flax models, transformers 4.57.6 the last
# line with Flax CLIP; the rest are the versions this code is tested against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "huggingface-hub==0.36.2",
    "tokenizers==0.22.2",
    "safetensors",
    "Pillow",
    "scikit-learn",
    "matplotlib",
    "tensorboardX",
    "fsspec",  # workdir URIs (runtime/fs.py); gs:// also needs gcsfs (launch/tpu_vm.sh installs it)
]
# torch is needed only to export to / check parity against PyTorch diffusers. Pin exactly:
# any other spec pulls a CUDA build of several GB.
TORCH = "torch==2.13.0"

setuptools.setup(
    name="ctrl_jax",
    version="0.1.0",
    description="CTRL: conditional control of pre-trained diffusion models by RL, in JAX",
    packages=setuptools.find_packages(include=["ctrl_jax", "ctrl_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [TORCH, "pytest", "pytest-xdist==3.8.0"],
        "export": [TORCH],
    },
)
