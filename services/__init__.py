"""vmgrid grid services: the container, the resource framework and the three services."""
