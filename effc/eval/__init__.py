"""effc.eval."""
