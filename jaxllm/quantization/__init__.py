"""Quantized checkpoints: what a quantized linear is (linear_quant.py) and the formats that store them."""
