"""Template tests of charts/natsmesh: pytest over `helm template` / `helm lint` output."""
