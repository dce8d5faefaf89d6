"""Networks only: no training logic (the README's Layout)."""
