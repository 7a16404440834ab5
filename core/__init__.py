"""The model and everything that holds or moves weights."""
