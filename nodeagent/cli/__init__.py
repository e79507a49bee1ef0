"""Command-line interface: argument parsing and output only, no logic.

Each module in this package that defines ``register(subparsers)`` adds its
subcommands; ``main`` discovers them, so a new command is one new module.
"""
