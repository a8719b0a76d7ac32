"""handlers layer; see the package docstring of natsmesh_operator."""
