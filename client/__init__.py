"""The vmgrid client library (zeep) and command line."""
