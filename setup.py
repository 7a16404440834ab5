from setuptools import setup

# Name note: the top-level package `kernels` has the import name of Hugging Face's hub-kernels library (distribution
# `kernels`), and only one of the two can be imported in a process. transformers enables its hub-kernels integration
# when that name's distribution version is in its supported range (0.18.2 <= v < 0.19.0 seen in earlier 5.x,
# 0.19.1 <= v < 0.20.0 in 5.25) and then imports names from `kernels` that ours does not have. With HF's
# distribution absent, transformers reads this distribution's version for the name, so keep it outside those
# ranges; and transformers >= 5.25 installs HF's `kernels` as a hard dependency, so the extras that bring
# transformers (tests, the HF anchors of the benchmarks) stop below 5.25. tests/test_packaging.py checks that
# transformers does not take us for it.
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
        "test": ["pytest>=7", "transformers>=4.45,<5.25", "matplotlib"],
        "bench": ["transformers>=4.45,<5.25", "math-verify"],
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
    },
)
