"""effc.ir."""
