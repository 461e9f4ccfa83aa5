"""The slideio package (code map in histo_wsl/README.md)."""
