"""The n-gram engine against infini-gram 2.6.0, and at 100M+ tokens."""
