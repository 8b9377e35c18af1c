"""Launchers: shape and stride bookkeeping, allocation, configuration choice and the launch of
the kernels, or the chunked PyTorch path for tensors the kernels do not take (``common.use_triton``)."""
