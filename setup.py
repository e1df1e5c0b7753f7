"""fastssl: self-supervised image-representation training with a GPU data pipeline."""

from setuptools import setup

setup(
    name="fastssl",
    version="0.1.0",
    description="Classic self-supervised methods (Spatial Contrasting, Exemplar-CNN, layer-wise "
    "contrastive, Invariance Propagation, Split-Brain) with DALI pipelines, DDP/AMP and FAISS.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastssl",
        "fastssl.engine",
        "fastssl.data",
        "fastssl.methods",
        "fastssl.models",
        "fastssl.knn",
        "fastssl.eval",
        "fastssl.kernels",
    ],
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "nvidia-dali-cuda120>=1.30",
        "faiss-gpu>=1.8",  # its wheel also runs CPU indices on machines without a GPU
        "omegaconf>=2.3",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "pillow>=9",
        "matplotlib>=3.5",  # the run report (fastssl.report), which the demo writes
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "scikit-image>=0.20", "ruff>=0.5"]},
    entry_points={"console_scripts": ["fastssl=fastssl.cli:main", "fastssl-eval=fastssl.eval.__main__:main"]},
)
