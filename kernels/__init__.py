"""Triton scan kernels (linear scan, fused LRN/oLRN/SRU recurrences) and PyTorch references.

Not built yet (the model zoo and kernels issue). Kernels will know nothing of training.
"""
