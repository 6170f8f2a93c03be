"""GridFTP-compatible transfer: parallel MODE E streams, restart markers, checksums, secured channels."""
