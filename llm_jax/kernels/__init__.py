"""Hand-written kernels (through the XLA FFI) for what XLA compiles poorly."""
