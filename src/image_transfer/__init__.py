"""image-transfer."""
