"""smallssl: self-supervised training, distillation and evaluation of small vision models."""

from setuptools import find_packages, setup

setup(
    name="smallssl",
    version="0.1.0",
    description="Contrastive self-supervised training, SEED distillation and evaluation of small vision models",
    python_requires=">=3.9",
    # experiments/ runs from the repository root (python -m experiments.demo); it is not installed
    packages=find_packages(include=["smallssl", "smallssl.*", "kernels", "kernels.*", "eval", "eval.*"]),
    py_modules=["main_moco", "main_transfer"],
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm",
        "faiss-cpu",
        "submitit",
        "tqdm",
        "pillow",
        # Triton only ships wheels for Linux x86_64/aarch64; the kernels fall back to PyTorch without it.
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "ruff", "tensorboard", "onnx", "onnxruntime"],  # so CI exercises the optional paths
        "viz": ["scikit-learn", "matplotlib"],
        "tb": ["tensorboard"],
        "onnx": ["onnx", "onnxruntime"],
    },
)
