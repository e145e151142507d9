"""Acquirer-side ISO 8583 payment gateway."""

__version__ = "0.1.0"
