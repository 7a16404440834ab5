from setuptools import setup

# The repository's folders are installed as one namespace, `posttrain` (posttrain.core, posttrain.kernels, ...), so the
# library sits next to any other: Hugging Face's `kernels` (a hard dependency of transformers >= 5.25), or a user's
# own `core` or `eval` package. The folders have no __init__.py on purpose: from the repository root (on sys.path
# under `python -m` and pytest) a folder with one would be a top-level package that shadows a library of the same
# name; without one it is at most a namespace portion, which every regular package of that name outranks.
FOLDERS = ["core", "kernels", "train", "eval", "bench"]
PACKAGES = {f"posttrain.{folder}": folder for folder in FOLDERS} | {"posttrain.train.msft": "train/msft"}

setup(
    name="posttrain",
    version="0.2.0",
    description="A low-level, performance-first LLM post-training library (SFT, mSFT, GRPO, PerMix) in plain PyTorch "
                "+ Triton.",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"posttrain.eval": ["data/*", "data/personagym/*", "data/personas/*"],
                  "posttrain.train": ["data/*", "data/tiny_tokenizer/*"]},
    install_requires=[
        "torch>=2.6",
        "triton; sys_platform == 'linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "sympy>=1.12",
        "jinja2>=3.1.6",  # older sandboxes have known escapes (core/tokenizer.py checks)
        "tqdm",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        # pyarrow, wandb: the Parquet and W&B paths; datasets: the tests make a real save_to_disk folder with it;
        # hypothesis: the verifier's property tests
        "test": ["pytest>=7", "transformers>=4.45", "matplotlib", "import-linter>=2.1", "hypothesis>=6",
                 "pyarrow>=14.0.1", "wandb>=0.17", "datasets>=2.14"],
        "bench": ["transformers>=4.45", "math-verify"],
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
        "data": ["pyarrow>=14.0.1"],  # Parquet files and save_to_disk folders as data (14.0.1: CVE-2023-47248)
        "wandb": ["wandb>=0.17"],  # log.wandb = true
    },
)
