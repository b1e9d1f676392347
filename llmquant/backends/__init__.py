"""Turning chosen weights into a quantization library's layers and checkpoint tensors."""
