"""Data shipped with effc (sentences for the MiniLM zoo entry) and the zoo's sample generators."""
