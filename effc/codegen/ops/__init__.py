"""TVM lowerings of effc operators: one module per operator, each registering its converter on import."""
