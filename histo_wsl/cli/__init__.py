"""The ``histo-wsl`` command line: one module per subcommand, each a thin layer over the library.

Nothing here imports torch, OpenSlide or numpy at module level, so ``histo-wsl --help`` stays fast.
"""
