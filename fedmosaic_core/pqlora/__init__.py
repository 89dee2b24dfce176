"""fedmosaic_core/pqlora."""
