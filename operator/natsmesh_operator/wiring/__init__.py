"""wiring layer; see the package docstring of natsmesh_operator."""
