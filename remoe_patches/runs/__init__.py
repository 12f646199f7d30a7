"""A run directory's layout and metrics, and the CSV writer: no torch."""
