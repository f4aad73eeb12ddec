"""Checkpoint interoperability: Hugging Face import and export (hf.py)."""
