"""Pure ``@triton.jit`` kernels and the helpers they share; nothing here allocates or launches."""
