"""effc.codegen."""
