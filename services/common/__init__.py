"""The lowest layer of vmgrid, imported by everything above it and importing nothing of vmgrid:
user-facing errors (:mod:`.errors`), crash injection for the crash tests (:mod:`.crash`), where the
published contract lives (:mod:`.paths`) and xs:dateTime / xs:duration (:mod:`.xsdtime`)."""
