from setuptools import setup

# Version note: the top-level package `kernels` is visible to other libraries under this distribution's version.
# transformers switches on Hugging Face's hub-kernels integration for 0.18.2 <= v < 0.19.0, so stay outside it
# (tests/test_packaging.py checks that transformers does not take us for that library).
setup(
    name="posttrain",
    version="0.1.0",
    description="A low-level, performance-first LLM post-training library (SFT, GRPO) in plain PyTorch + Triton.",
    python_requires=">=3.10",
    packages=["core", "kernels", "train", "eval", "bench"],
    package_data={"eval": ["data/*", "data/personagym/*"],
                  "train": ["data/*", "data/tiny_tokenizer/*", "data/personas/*"]},
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
        "test": ["pytest>=7", "transformers>=4.45", "matplotlib"],
        "bench": ["transformers>=4.45", "math-verify"],
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
    },
)
