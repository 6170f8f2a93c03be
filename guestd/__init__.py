"""guestd: the daemon inside a vmgrid VM (standard library only)."""
