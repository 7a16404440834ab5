"""One entry point per training stage, plus data mixtures and RL math."""
