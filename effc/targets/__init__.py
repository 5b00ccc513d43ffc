"""effc.targets."""
