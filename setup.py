from setuptools import find_packages, setup

setup(
    name="moetrain",
    version="0.1.0",
    description="Distributed expert-parallel Mixture-of-Experts training on PyTorch",
    packages=find_packages(include=["moetrain", "moetrain.*"]),
    python_requires=">=3.10",
    # torch: CPU machines and CI pin the CPU wheel in requirements/ci.txt; GPU users bring CUDA torch.
    install_requires=["torch>=2.6", "omegaconf>=2.3", "tensorboard>=2.14", "tqdm>=4.60", "numpy>=1.24"],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "matplotlib>=3.7", "safetensors>=0.4"],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],     # train.engine=deepspeed is tested with 0.19.8
        "mpi": ["mpi4py>=3.1"],
        "gpu": ["nvidia-ml-py>=12"],
        # tokenizers/real data formats (tools/prepare_data.py), Hugging Face export/import
        # (tools/export_hf.py, tools/import_hf.py); the training path never imports them
        "hf": ["transformers>=5.0,<6", "tokenizers>=0.21", "pyarrow>=15"],
    },
    entry_points={"console_scripts": ["moetrain-train=moetrain.train.cli:main"]},
)
