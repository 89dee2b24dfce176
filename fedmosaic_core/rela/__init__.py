"""fedmosaic_core/rela."""
