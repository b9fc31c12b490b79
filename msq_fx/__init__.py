"""msq_fx: MSQ mixed-precision quantization for PyTorch models."""
