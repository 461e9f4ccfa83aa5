"""``python -m histo_wsl`` runs the CLI (what ``torchrun -m histo_wsl ...`` needs)."""

from histo_wsl.cli.app import main

if __name__ == "__main__":
    main()
