"""The evaluation package (code map in histo_wsl/README.md)."""
