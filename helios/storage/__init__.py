"""Helios model cache: content-addressed blobs in tiers, transfers and the vLLM loader."""
