"""effc.runtime."""
