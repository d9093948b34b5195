"""kavg-ray: find the best model-averaging period K for distributed SGD on Ray."""

__version__ = "0.1.0"
