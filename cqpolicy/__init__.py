"""cqpolicy: learn when a diffusion model may skip work."""
__version__ = "0.1.0"
