"""The job service: vmgrid's GRAM ManagedJobFactory, run by the grid container in a scientist's VM."""
