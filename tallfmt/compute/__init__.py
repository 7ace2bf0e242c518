"""Tensor math in torch on any device: the TALL-masks mask math and the torch ↔ stored-bytes bridge."""
