"""fedmosaic_core."""
