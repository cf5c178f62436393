"""TracIn proponents and opponents for PyKEEN models."""

__version__ = "0.1.0"
