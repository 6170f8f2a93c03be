"""The Authorization service: policy decisions for every operation of the other services."""
