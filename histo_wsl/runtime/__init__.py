"""The runtime package (code map in histo_wsl/README.md)."""
