"""fedmosaic_core/models."""
