"""Benchmarks (transport goodput and friends); each module has a ``__main__``."""
