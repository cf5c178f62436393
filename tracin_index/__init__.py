"""TracIn proponents and opponents for PyKEEN models."""
