"""Triton kernels, each next to its plain-torch reference and its autograd wrapper."""
