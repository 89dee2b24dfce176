"""drake_data."""
