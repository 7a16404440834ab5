"""python -m posttrain.train.msft --config FILE [--section.key=value ...]: the mSFT comparison (train/msft/study.py)."""

from posttrain.train.msft.study import main

main()
