"""Host-side tools that make vmgrid's guest images (not part of guestd itself; may use anything)."""
