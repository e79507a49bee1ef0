"""The agent's state: converts xDS resources into model values and keeps them indexed.

`updater.StateUpdater` is what the xDS client calls; `store.StateStore` is what
the rest of the agent reads and subscribes to.
"""
