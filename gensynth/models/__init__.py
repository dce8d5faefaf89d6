"""Networks only: no training logic (DESIGN.md, "Layout")."""
