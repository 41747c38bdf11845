"""Offline pretrained model sources: weights that ship inside pip packages, converted once into a user cache."""
