"""The VMRepository service: a VO's catalogue of VM images and their content-addressed bytes."""
