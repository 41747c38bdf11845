"""Codecs turn named tensors into bytes and back; the byte count of an update is ``len(payload)``."""
