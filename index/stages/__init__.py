"""The build-index stages of the index package, one module per stage, each named for its stage."""
